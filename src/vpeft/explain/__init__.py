"""Explainability: where an adapted model looks, what adaptation changed, which added
parameters matter.

>>> from vpeft.explain import explain, explain_run
>>> explain_run("runs/cifar10-lora", "images/", "explain/", split="val200")

Modules: :mod:`~vpeft.explain.rollout` (attention capture and rollout),
:mod:`~vpeft.explain.gradmaps` (Grad-CAM, gradient-weighted rollout, Integrated Gradients
via Captum),
:mod:`~vpeft.explain.attribution` (update and added-output sizes, ablation per block),
:mod:`~vpeft.explain.figures` (PNG figures), :mod:`~vpeft.explain.explainer` (the whole report).
"""

from vpeft.explain.attribution import (
    ablation,
    added_outputs,
    blocks_with_added,
    switch_off_block,
    update_ratios,
)
from vpeft.explain.explainer import collect_images, copy_head, explain, explain_run
from vpeft.explain.gradmaps import gradcam, gradient_rollout, integrated_gradients
from vpeft.explain.rollout import (
    added_token_mass,
    capture_attention,
    prompt_patch_maps,
    rollout,
    rollout_map,
    token_layout,
)

__all__ = [
    "ablation", "added_outputs", "added_token_mass", "blocks_with_added", "capture_attention",
    "collect_images", "copy_head", "explain", "explain_run", "gradcam", "gradient_rollout",
    "integrated_gradients",
    "prompt_patch_maps", "rollout", "rollout_map", "switch_off_block", "token_layout",
    "update_ratios",
]
