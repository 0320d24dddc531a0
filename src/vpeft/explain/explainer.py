"""Explain an adapted model against its base: maps per image, attribution per block, figures.

:func:`explain` works on models in memory; :func:`explain_run` on a run folder made by
``vpeft train`` (what ``vpeft explain`` calls). Both write into ``out``:

* ``<image>.png``: per image, one row per map kind (attention rollout, gradient-weighted
  rollout, Grad-CAM, Integrated Gradients): the image, the base model's map, the adapted model's
  map, their difference.
* ``prompts_<image>.png``: for methods that add tokens or keys (VPT, prefix ...), which patches
  attend to each added token.
* ``attribution_blocks.png`` / ``attribution_heatmap.png``: update size, added-output size,
  attention mass on added tokens and ablation importance, per block and per module.
* ``maps.npz``: every map at the image's own resolution, keyed ``<file name>/<kind>/<model>``
  with ``<model>`` one of ``base``, ``adapted``, ``diff``.
* ``summary.json``: predictions, every quantity, and under ``absent`` why a quantity that does not
  apply to this method or backbone is missing.

The *base model* is the backbone without the method plus the trained head: what the head alone
would do. Each map is scaled to [0, 1] (its minimum to 0, its maximum to 1) before the
difference is taken.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vpeft.backbones.base import BackboneView, get_view
from vpeft.core.state import get_state
from vpeft.core.surgery import Wrapper
from vpeft.data import data_config, eval_transform
from vpeft.data.datasets import IMAGE_EXTENSIONS
from vpeft.explain import attribution, gradmaps
from vpeft.explain import figures as plots
from vpeft.explain.rollout import (
    added_token_mass,
    capture_attention,
    prompt_patch_maps,
    rollout_layout,
    rollout_map,
    token_layout,
)

logger = logging.getLogger(__name__)
MODELS = ("base", "adapted")


def collect_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files named by ``spec``: a folder (its images, sorted) or files."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise ValueError("no images given")
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            inside = sorted(p for p in item.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            found += inside
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return found


def _keys(paths: list[Path]) -> list[str]:
    """File names, made unique with the parent folder where two images share a name."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def copy_head(base: nn.Module, adapted: nn.Module, view: BackboneView) -> list[str]:
    """Give ``base`` the adapted model's trained head (in place); returns notes on heads that
    do not fit the plain backbone (a method that widened the head, as VQT does)."""
    notes = []
    for path in view.heads:
        head = adapted.get_submodule(path)
        while isinstance(head, Wrapper):
            head = head.base
        try:
            base.get_submodule(path).load_state_dict(head.state_dict())
        except RuntimeError:
            notes.append(f"the adapted head '{path}' does not fit the plain backbone (the method "
                         "changed its input); the base model keeps its own head")
    return notes


def _to_image(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized to the image's (H, W), scaled to [0, 1] (min to 0, max to 1)."""
    m = F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp_min(1e-12)).numpy().astype(np.float32)


def _pooled_by_prefix(model: nn.Module) -> bool:
    # timm models say how they pool; "token" (or no pooling attribute) reads the class token
    return getattr(model, "global_pool", "token") in ("token", "")


def _image_maps(models: dict[str, nn.Module], view: BackboneView, x: torch.Tensor,
                ig_steps: int, absent: dict[str, str]) -> tuple[dict, dict, Any]:
    """Raw maps of one image for each model, the predictions, and the adapted model's attention
    with its token layout (None where rollout does not apply)."""
    size = tuple(x.shape[-2:])
    raw: dict[str, dict[str, torch.Tensor]] = {}
    preds, atts = {}, {}
    for name, model in models.items():
        with torch.no_grad(), capture_attention(model, view) as att:
            preds[name] = model(x).softmax(-1)[0]
        atts[name] = (att, *rollout_layout(att, view, size, x.shape[0]))
    target = preds["adapted"].argmax().view(1)
    for name, model in models.items():
        maps = raw.setdefault(name, {})
        att, layout, why = atts[name]
        if layout is not None:
            maps["rollout"] = rollout_map(att, layout, _pooled_by_prefix(model))[0]
            maps["grad-rollout"] = gradmaps.gradient_rollout(model, view, x, target, layout,
                                                             _pooled_by_prefix(model))[0]
        else:
            absent["rollout"] = absent["grad-rollout"] = why
        maps["gradcam"] = gradmaps.gradcam(model, view, x, target, token_layout(view, size))[0]
        if ig_steps > 0:
            maps["ig"] = gradmaps.integrated_gradients(model, x, target, ig_steps)[0]
    if ig_steps <= 0:
        absent["ig"] = "switched off (ig_steps = 0)"
    att, layout, _ = atts["adapted"]
    return raw, preds, (att, layout) if layout is not None else None


def explain(adapted: nn.Module, base: nn.Module, images: str | Path | Sequence[str | Path],
            out: str | Path, img_size: int | None = None,
            batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            ig_steps: int = 16, classes: list[str] | None = None,
            info: dict[str, Any] | None = None, figures: bool = True) -> dict[str, Any]:
    """Explain ``adapted`` (a model adapted by vpeft) against ``base`` (the same backbone, not
    adapted; it gets the trained head here) on ``images``; write figures and data into ``out``.

    ``batches`` (``(images, labels)`` tensors, already preprocessed) enable the ablation;
    ``ig_steps`` = 0 skips Integrated Gradients; ``info`` is added to the summary; ``figures``
    False writes only maps.npz and summary.json (for scoring many images). Returns the summary
    written to summary.json.
    """
    state = get_state(adapted)
    paths = collect_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the plain backbone's view: paths are the same in both models, and a view found on the
    # adapted model may miss parts that wrappers hide (Hugging Face q/k/v)
    view = get_view(base)
    notes = copy_head(base, adapted, view)
    adapted.eval()
    base.eval()
    models = {"base": base, "adapted": adapted}
    transform = eval_transform(data_config(adapted, img_size))
    absent: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    per_image, xs, masses = [], [], []

    def label(c: int) -> str:
        return classes[c] if classes and c < len(classes) else str(c)

    for key, path in zip(_keys(paths), paths):
        try:
            pil = Image.open(path).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        x = transform(pil)[None]
        xs.append(x)
        raw, preds, att = _image_maps(models, view, x, ig_steps, absent)
        size = (pil.height, pil.width)
        shown: dict[str, dict[str, np.ndarray]] = {}
        for kind in [k for k in raw["adapted"] if k in raw["base"]]:
            m = {name: _to_image(raw[name][kind], size) for name in MODELS}
            m["diff"] = m["adapted"] - m["base"]
            shown[kind] = m
            for name, a in m.items():
                arrays[f"{key}/{kind}/{name}"] = a
        p_base, p_ad = (int(preds[n].argmax()) for n in MODELS)
        caption = (f"{path.name}   {state.config.method}: adapted predicts {label(p_ad)} "
                   f"({float(preds['adapted'][p_ad]):.2f}), base (head only) predicts "
                   f"{label(p_base)} ({float(preds['base'][p_base]):.2f}); maps for "
                   f"{label(p_ad)}")
        fig_name = f"{Path(key).stem}.png".replace("/", "_")
        if figures:
            plots.image_figure(out / fig_name, np.asarray(pil), shown, caption)
        entry = {"file": str(path), "key": key, "size": [pil.width, pil.height],
                 **({"figure": fig_name} if figures else {}),
                 "adapted": {"class": p_ad, "label": label(p_ad)},
                 "base": {"class": p_base, "label": label(p_base)},
                 "maps": sorted(shown)}
        if att is not None:
            att, layout = att
            masses.append([None if a is None else added_token_mass(a, layout) for a in att.maps])
            prompts = prompt_patch_maps(att, layout)
            if prompts is not None:
                up = np.stack([_to_image(m, size) for m in prompts[0]])
                arrays[f"{key}/prompts/adapted"] = up
                name = f"prompts_{fig_name}"
                if figures:
                    plots.prompt_figure(out / name, np.asarray(pil), up,
                                        f"{path.name}: patches attending to each prompt token "
                                        "(mean over blocks)")
                    entry["prompt_figure"] = name
                entry["prompt_top_patches"] = [
                    [int(i) for i in m.flatten().topk(min(5, m.numel())).indices]
                    for m in prompts[0]
                ]
        per_image.append(entry)
    summary = _summary(adapted, base, view, torch.cat(xs), masses, batches, absent)
    summary.update(images=per_image, notes=notes, **(info or {}))
    summary["figures"] = [f for e in per_image for f in (e.get("figure"), e.get("prompt_figure"))
                          if f]
    if figures:
        summary["figures"] += plots.attribution_figures(out, summary, view.blocks,
                                                        state.config.method)
    _write(out, summary, arrays)
    return summary


def _summary(adapted: nn.Module, base: nn.Module, view: BackboneView, x: torch.Tensor,
             masses: list, batches, absent: dict[str, str]) -> dict[str, Any]:
    state = get_state(adapted)
    summary: dict[str, Any] = {
        "method": state.config.method, "config": state.config.to_dict(),
        "backbone": state.base.get("architecture"), "blocks": view.blocks,
        "definitions": {
            "update": "per module ||W_adapted - W_base|| / ||W_base|| (merged weights)",
            "added_output": "per wrapped module, mean over the images of "
                            "||module(x) - base_module(x)|| / ||residual stream into the block|| "
                            "(outside the blocks: / ||base_module(x)||)",
            "prompt_mass": "per block, mean attention mass image tokens give added tokens/keys",
            "ablation": "loss/top-1 with one block's added modules switched off",
            "maps": "each map scaled to [0, 1] (min to 0, max to 1); diff = adapted - base",
        },
    }
    update = attribution.update_ratios(adapted, base, view)
    if update is None:
        absent["update"] = "the method changes no base weight (it only adds modules)"
    else:
        summary["update"] = update
    added = attribution.added_outputs(adapted, view, x)
    if added is None:
        absent["added_output"] = ("no module in a block wraps a base module with an output of "
                                  "the same shape")
    else:
        summary["added_output"] = added
    per_block = [[m[i] for m in masses if m[i] is not None] for i in range(view.depth)]
    if masses and any(per_block):
        summary["prompt_mass"] = [float(torch.cat(v).mean()) if v else None for v in per_block]
    else:
        absent["prompt_mass"] = ("no added tokens or keys in the attention"
                                 if masses else "no global token attention to measure")
    if batches is None:
        absent["ablation"] = "no labelled split given (--split)"
    elif not attribution.blocks_with_added(adapted, view):
        absent["ablation"] = "the method adds or trains nothing inside the blocks"
    else:
        summary["ablation"] = attribution.ablation(adapted, base, view, batches)
    summary["absent"] = absent
    return summary


def _write(out: Path, summary: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    tmp = out / "maps.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out / "maps.npz")
    text = json.dumps(summary, indent=2)
    tmp_json = out / "summary.json.tmp"
    tmp_json.write_text(text + "\n")
    tmp_json.replace(out / "summary.json")


def split_batches(model: nn.Module, data: str | Path, split: str, img_size: int | None,
                  classes: list[str] | None, limit: int | None = None,
                  batch_size: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` images of ``split`` of ``data``, preprocessed as for evaluation."""
    from vpeft.data import open_dataset

    dataset = open_dataset(data, split, classes=classes)
    dataset.transform = eval_transform(data_config(model, img_size))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    batches = []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        batches.append((torch.stack([a for a, _ in items]),
                        torch.tensor([b for _, b in items])))
    return batches


def explain_run(run: str | Path, images: str | Path | Sequence[str | Path], out: str | Path,
                split: str | None = None, limit: int | None = None, ig_steps: int = 16,
                weights: str | None = None, data: str | None = None,
                figures: bool = True) -> dict[str, Any]:
    """:func:`explain` on the model of run folder ``run`` (its backbone rebuilt as in training,
    on the CPU); ``split`` (e.g. ``val200``) of the run's data (or ``data``) feeds the ablation,
    its first ``limit`` images if given."""
    from vpeft.core.checkpoint import read_config
    from vpeft.engine.evaluate import load_run
    from vpeft.engine.model import build_backbone
    from vpeft.engine.runtime import seed_everything

    collect_images(images)  # bad input fails before the models are built
    adapted, config, classes = load_run(run, weights)
    seed_everything(config.seed)  # the same random init as the run's, if it had no weights
    base = build_backbone(config.model, read_config(run)["base"]["num_classes"],
                          weights or config.weights, config.pretrained, config.img_size,
                          config.model_args)
    batches, info = None, {"run": str(run)}
    if split:
        batches = split_batches(adapted, data or config.data, split, config.img_size, classes,
                                limit)
        info["split"] = {"data": str(data or config.data), "split": split,
                         "images": sum(len(b[1]) for b in batches)}
    return explain(adapted, base, images, out, config.img_size, batches, ig_steps, classes, info,
                   figures)
