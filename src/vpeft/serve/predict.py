"""What ``vpeft predict`` and ``vpeft serve`` share: a run's classes and preprocessing, decoding an
uploaded image, and turning logits into top-k labels with probabilities."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vpeft.data import IMAGE_EXTENSIONS, DataError, ImageDataset, data_config, eval_transform
from vpeft.engine.config import TrainConfig

Transform = Callable[[Image.Image], torch.Tensor]


def run_transform(model: nn.Module, config: TrainConfig) -> Transform:
    """The preprocessing a run's evaluation uses (``vpeft eval``): the model's data config at the
    run's image size, resized without a crop, normalised."""
    return eval_transform(data_config(model, config.img_size))


def class_names(classes: list[str] | None, num_classes: int) -> list[str]:
    """A run's class names (its ``classes.txt``), or the label numbers where it has none."""
    if classes is not None and len(classes) == num_classes:
        return classes
    return [str(i) for i in range(num_classes)]


def top_k(logits: torch.Tensor, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image's ``logits``: label, index, probability."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, index = probs.topk(min(k, probs.shape[-1]))
    return [{"label": classes[i], "index": i, "probability": v}
            for i, v in zip(index.tolist(), values.tolist())]


def decode_image(data: bytes) -> Image.Image:
    """An uploaded file as an RGB PIL image; ``ValueError`` saying why when it is not one."""
    if not data:
        raise ValueError("the upload is empty; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not an image that can be read: {e}") from None


def find_images(items: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``items``: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    if not found:
        raise DataError("no images given")
    return found


def image_files_dataset(files: list[Path], classes: list[str]) -> ImageDataset:
    """``files`` as an :class:`ImageDataset` (labels unknown, given as 0) that reads them lazily
    and names a file it cannot read."""
    return ImageDataset(Path("."), "predict", "files", classes, [0] * len(files),
                        [str(f) for f in files], sources=list(files))
