"""Predicted masks as files: a palette PNG of class indices and a colour overlay per image.

The PNG's pixel values are the class indices (a "P"-mode image: any tool reads the indices, an
image viewer shows the palette's colours); the overlay blends those colours over the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vpeft.core.checkpoint import atomic_write


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, class 0 black, the others distinct (the bit-interleaved palette
    of the PASCAL VOC devkit, so class ``i`` has the same colour in every vpeft output)."""
    colours = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(n):
        c, bit = i, 7
        while c:
            for ch in range(3):
                colours[i, ch] |= ((c >> ch) & 1) << bit
            c >>= 3
            bit -= 1
    return colours


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A palette PNG whose pixel values are ``mask``'s class indices."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette(max(num_classes, 1)).flatten().tolist())
    return img


def overlay(image: Image.Image, mask: np.ndarray, num_classes: int,
            alpha: float = 0.5) -> Image.Image:
    """``image`` with each pixel's class colour blended in at ``alpha``."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = palette(num_classes)[mask].astype(np.float32)
    return Image.fromarray(((1 - alpha) * rgb + alpha * colours).round().astype(np.uint8))


def _save(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


@torch.inference_mode()
def write_masks(model: nn.Module, task: Any, files: list[Path], out: Path, transform: Any,
                size: int, num_classes: int, overwrite: bool = False,
                device: torch.device | None = None) -> list[dict[str, Any]]:
    """Predict a mask for each image file with ``task.infer`` (the run's evaluation: resized or
    sliding windows, brought back to the image's own size) and write ``<stem>.png`` (class
    indices) and ``<stem>_overlay.png`` into ``out``. Existing files are never replaced unless
    ``overwrite``; two inputs with the same file name are refused up front."""
    device = device or torch.device("cpu")
    stems = [f.stem for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"several images are named {dup[0]} (in different folders); their masks "
                         "would overwrite each other: predict them into separate --out folders")
    targets = [(out / f"{s}.png", out / f"{s}_overlay.png") for s in stems]
    taken = [str(p) for pair in targets for p in pair if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{taken[0]} exists ({len(taken)} files would be replaced); pass "
                              "--overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model.to(device).eval()
    written = []
    for path, (mask_path, overlay_path) in zip(files, targets, strict=True):
        image = Image.open(path).convert("RGB")
        blank = Image.new("L", image.size)  # carries the size the prediction is brought back to
        x, m = transform(image, blank)
        logits = task.infer(model, x.unsqueeze(0).to(device), m.unsqueeze(0).to(device), size)
        pred = logits[0].argmax(0).cpu().numpy()
        _save(mask_image(pred, num_classes), mask_path)
        _save(overlay(image, pred, num_classes), overlay_path)
        classes = np.bincount(pred.ravel(), minlength=num_classes)
        written.append({"image": str(path), "mask": str(mask_path),
                        "overlay": str(overlay_path),
                        "pixels": {int(c): int(n) for c, n in enumerate(classes) if n}})
    return written
