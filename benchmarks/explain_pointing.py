"""Pointing game of every map ``vpeft explain`` draws, on one LoRA-adapted real DeiT-Tiny.

The setting of ``tests/test_explain.py::test_localisation_gradcam_points_at_the_object_after_lora``
(half-white squares on noise, 64 px, 20 px objects, LoRA rank 4, 240 training images, 3 epochs,
60 test images): train once, then score Grad-CAM (the tokens entering the last block), attention
rollout and Integrated Gradients of the true class, each taken at the image's resolution as
``vpeft explain`` writes them (``_to_image``: bilinear, min-max scaled). Also the pointing game
with Zhang et al.'s (2016) tolerance (15 px at 224 px, scaled to the image) and its chance level.

    PYTHONPATH=src OMP_NUM_THREADS=2 nice -n 10 python benchmarks/explain_pointing.py \\
        --weights ../shared/weights/deit_tiny_patch16_224.fb_in1k.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file

import vpeft
from vpeft.explain import capture_attention, gradcam, integrated_gradients, token_layout
from vpeft.explain.explainer import _to_image
from vpeft.explain.gradmaps import gradient_rollout
from vpeft.explain.localisation import area_fraction, pointing_game, shape_images
from vpeft.explain.rollout import rollout_layout, rollout_map


def dilate(boxes: np.ndarray, tol: int, size: int) -> np.ndarray:
    out = boxes.copy()
    out[:, :2] = np.maximum(boxes[:, :2] - tol, 0)
    out[:, 2:] = np.minimum(boxes[:, 2:] + tol, size)
    return out


def scores(model: torch.nn.Module, xt: torch.Tensor, yt: torch.Tensor, boxes: np.ndarray,
           size: int, ig_steps: int) -> dict[str, float]:
    """Pointing game of each map of ``model`` for the true classes, without and with tolerance."""
    view = vpeft.get_view(model)
    layout = token_layout(view, (size, size))
    maps = {"gradcam": gradcam(model, view, xt, yt, layout)}
    with torch.no_grad(), capture_attention(model, view) as att:
        model(xt)
    lay, _ = rollout_layout(att, view, (size, size), len(xt))
    maps["rollout"] = rollout_map(att, lay, True)
    maps["grad-rollout"] = gradient_rollout(model, view, xt, yt, lay, True)
    if ig_steps:
        maps["ig"] = torch.cat([integrated_gradients(model, xt[i:i + 1], yt[i:i + 1], ig_steps)
                                for i in range(len(xt))])
    tol = round(15 * size / 224)
    out = {}
    for kind, m in maps.items():
        up = np.stack([_to_image(a, (size, size)) for a in m])
        out[kind] = pointing_game(up, boxes)
        out[f"{kind}_with_tolerance"] = pointing_game(up, dilate(boxes, tol, size))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--control", action="store_true",
                   help="also score the backbone before training (random head): chance level?")
    p.add_argument("--adapter", help="safetensors file: load the trained adapter from it if it "
                                     "exists, else train and save it there")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size, obj = 64, 20
    model = timm.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=3,
                              img_size=size, pretrained_cfg_overlay=dict(file=args.weights))
    torch.manual_seed(0)
    vpeft.adapt(model, "lora", rank=4)

    def tensors(n: int, seed: int):
        images, labels, boxes = shape_images(n, size, obj, seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return (x - 0.5) / 0.5, torch.from_numpy(labels), boxes

    if args.adapter and Path(args.adapter).is_file():  # the model trained by an earlier run
        model.load_state_dict(load_file(args.adapter), strict=False)
    else:
        x, y, _ = tensors(240, 0)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-3)
        model.train()
        for _ in range(3):
            for idx in torch.randperm(len(x)).split(32):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if args.adapter:
            save_file(vpeft.adapter_state_dict(model), args.adapter)
    model.eval()
    xt, yt, boxes = tensors(60, 1)
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
    result = {"top1": acc, "box_area": area_fraction(boxes, size, size),
              "tolerance_px": round(15 * size / 224)}
    result["box_area_with_tolerance"] = area_fraction(dilate(boxes, result["tolerance_px"], size),
                                                      size, size)
    result |= scores(model, xt, yt, boxes, size, args.ig_steps)
    if args.control:  # the same maps of the backbone before training (its random head): chance?
        control = timm.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=3,
                                    img_size=size, pretrained_cfg_overlay=dict(file=args.weights))
        result["control_untrained"] = scores(control.eval(), xt, yt, boxes, size, args.ig_steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
