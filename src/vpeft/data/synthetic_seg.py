"""A generated semantic segmentation task: small real objects pasted onto real backgrounds.

Each image is a background (a CIFAR-10 image of a VTAB-1k list-file folder, resized up to the
image side; without one, smooth random colour blocks) with 1-3 objects on it (digits of ``mnist``,
items of ``fashion_mnist``: gray images whose brightness is the object; without them, drawn
shapes). An object is a square of ``25-50%`` of the image side at a random place, painted in one
random colour that stands out from the background under it, with its gray level as opacity;
objects may overlap, later ones on top.

The mask holds the object's class (``1..K``; ``0`` is the background) where the object's opacity
is at least :data:`HIGH`, keeps what lies below where it is under :data:`LOW`, and is
:data:`~vpeft.data.segmentation.IGNORE_INDEX` (255) in between: the anti-aliased edge, a mix of
object and background, is scored as neither.

Splits ``train`` / ``val`` / ``test`` take their backgrounds and objects from the sources'
``train800`` / ``val200`` / ``test`` lists, so no source image is shared between splits. The
folder is the layout :func:`~vpeft.data.segmentation.open_segmentation_dataset` reads:
``img_dir/<split>/NNNNNN.jpg``, ``ann_dir/<split>/NNNNNN.png``, ``classes.txt``
(``background`` first), plus ``objects.json`` (per image: each object's class, box and colour).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vpeft.core.checkpoint import atomic_write_text
from vpeft.data.datasets import read_list
from vpeft.data.segmentation import ANN_DIR, IGNORE_INDEX, IMG_DIR
from vpeft.data.synthetic_video import MotionSpec, mosaic, source_images

LOW, HIGH = 0.2, 0.6  # opacity: below LOW a pixel keeps its label, from HIGH it is the object
SPLIT_SOURCES = {"train": "train800", "val": "val200", "test": "test"}  # split -> source list
SHAPES = ("disk", "square", "triangle", "ring", "cross", "bar")  # objects without --objects
FORMATS = ("jpg", "png")


@dataclass
class SegSpec:
    """What to generate (see the module docstring)."""

    size: int = 128  # image side in pixels
    objects: tuple[int, int] = (1, 3)  # objects per image, drawn uniformly in [low, high]
    scale: tuple[float, float] = (0.25, 0.5)  # object side / image side, drawn uniformly
    max_classes: int | None = None  # use only the first N object classes
    fmt: str = "jpg"  # image files (masks are always PNG)

    def validate(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects per image must be 1 <= low <= high, got {self.objects}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"object scale must be 0 < low <= high <= 1, got {self.scale}")
        if self.max_classes is not None and self.max_classes < 1:
            raise ValueError(f"max classes must be >= 1, got {self.max_classes}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")


def object_pool(folders: list[Path] | None, split: str, max_classes: int | None = None
                ) -> tuple[list[str], list[tuple[Path | str, int]]]:
    """``(class names, [(source, class index)])`` of one source split: the images of VTAB-1k
    folders (classes ``<folder>:<name>`` in folder order), or the drawn :data:`SHAPES`."""
    if not folders:
        classes = list(SHAPES)
        items: list[tuple[Path | str, int]] = [(s, k) for k, s in enumerate(SHAPES)]
    else:
        classes, items = [], []
        for folder in folders:
            names, paths, labels, _ = read_list(Path(folder), split, None)
            items += [(p, len(classes) + label) for p, label in zip(paths, labels)]
            classes += [f"{Path(folder).name}:{name}" for name in names]
    keep = len(classes) if max_classes is None else min(max_classes, len(classes))
    return classes[:keep], [(s, k) for s, k in items if k < keep]


def opacity(rng: np.random.Generator, source: Path | str, side: int) -> np.ndarray:
    """The ``side x side`` float opacity (0..1) of an object: a gray image's brightness, or a shape
    drawn 4x larger and reduced (so that its edge is anti-aliased like a resized digit's)."""
    if isinstance(source, Path):
        with Image.open(source) as img:
            gray = img.convert("L").resize((side, side), Image.Resampling.BILINEAR)
    else:
        big = 4 * side
        gray = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(gray)
        m, c = big // 8, big // 2  # margin, centre
        if source == "disk":
            draw.ellipse((m, m, big - m, big - m), fill=255)
        elif source == "square":
            draw.rectangle((2 * m, 2 * m, big - 2 * m, big - 2 * m), fill=255)
        elif source == "triangle":
            draw.polygon([(c, m), (big - m, big - m), (m, big - m)], fill=255)
        elif source == "ring":
            draw.ellipse((m, m, big - m, big - m), fill=255)
            draw.ellipse((3 * m, 3 * m, big - 3 * m, big - 3 * m), fill=0)
        elif source == "cross":
            draw.rectangle((c - m, m, c + m, big - m), fill=255)
            draw.rectangle((m, c - m, big - m, c + m), fill=255)
        else:  # bar
            draw.rectangle((m, c - m // 2, big - m, c + m // 2), fill=255)
        angle = float(rng.uniform(0, 360))
        gray = gray.rotate(angle, Image.Resampling.BILINEAR).resize((side, side),
                                                                     Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float32) / 255.0


def paste(image: np.ndarray, mask: np.ndarray, alpha: np.ndarray, colour: np.ndarray,
          label: int, y: int, x: int) -> None:
    """Paint ``colour`` with opacity ``alpha`` at ``(y, x)`` of ``image`` (float HxWx3) and set
    ``mask`` there: ``label`` from :data:`HIGH`, ignore between :data:`LOW` and HIGH."""
    h, w = alpha.shape
    region = image[y:y + h, x:x + w]
    region += alpha[..., None] * (colour - region)
    m = mask[y:y + h, x:x + w]
    m[(alpha > LOW) & (alpha < HIGH)] = IGNORE_INDEX
    m[alpha >= HIGH] = label


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far (in RGB) from the mean colour ``under`` the object, so it is visible."""
    mean = under.reshape(-1, 3).mean(0)
    best = rng.integers(0, 256, 3).astype(np.float32)
    for _ in range(20):
        if np.linalg.norm(best - mean) >= 150:
            break
        best = rng.integers(0, 256, 3).astype(np.float32)
    return best


def compose(rng: np.random.Generator, spec: SegSpec, backgrounds: list[Path],
            pool: list[tuple[Path | str, int]], num_classes: int
            ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One ``(uint8 image, uint8 mask, objects)``; ``objects`` lists each pasted object's mask
    ``class``, ``box`` ``[x0, y0, x1, y1]`` (exclusive end), ``colour`` and ``source``."""
    size = spec.size
    image = mosaic(rng, MotionSpec(size=size, tiles=1), backgrounds).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    by_class = [[s for s, k in pool if k == c] for c in range(num_classes)]
    present = [c for c in range(num_classes) if by_class[c]]  # a small source split may lack one
    objects = []
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        k = present[rng.integers(len(present))]
        source = by_class[k][rng.integers(len(by_class[k]))]
        side = max(2, round(rng.uniform(*spec.scale) * size))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        colour = _colour(rng, image[y:y + side, x:x + side])
        paste(image, mask, opacity(rng, source, side), colour, k + 1, y, x)
        objects.append({"class": k + 1, "box": [x, y, x + side, y + side],
                        "colour": colour.astype(int).tolist(), "source": str(source)})
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, objects


def _require_lists(folder: Path, what: str) -> None:
    missing = [s for s in SPLIT_SOURCES.values() if not (Path(folder) / f"{s}.txt").is_file()]
    if missing:
        raise ValueError(f"{what} {folder} has no {missing[0]}.txt: expected a VTAB-1k list-file "
                         f"folder with {', '.join(f'{s}.txt' for s in SPLIT_SOURCES.values())}")


def make_seg_data(out: str | Path, images: dict[str, int] | None = None,
                  spec: SegSpec | None = None, background: str | Path | None = None,
                  objects: list[str | Path] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write a generated segmentation task to ``out`` (see the module docstring) and return its
    summary. ``images``: images per split (default ``train: 400, val: 100, test: 200``); split
    names must be those of :data:`SPLIT_SOURCES`. ``background``: a VTAB-1k folder (CIFAR-10);
    ``objects``: VTAB-1k folders of gray objects (MNIST, Fashion-MNIST). Deterministic in
    ``seed``."""
    spec = spec or SegSpec()
    spec.validate()
    images = images or {"train": 400, "val": 100, "test": 200}
    unknown = [s for s in images if s not in SPLIT_SOURCES]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}: splits are {list(SPLIT_SOURCES)}")
    folders = [Path(f) for f in objects or []]
    for folder in folders:
        _require_lists(folder, "objects folder")
    if background is not None:
        _require_lists(Path(background), "background folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: dict[str, list[dict[str, Any]]] = {}
    pixels = np.zeros(256, np.int64)
    classes: list[str] = []
    for split, count in images.items():
        source = SPLIT_SOURCES[split]
        classes, pool = object_pool(folders, source, spec.max_classes)
        backgrounds = source_images(background, source) if background is not None else []
        (out / IMG_DIR / split).mkdir(parents=True, exist_ok=True)
        (out / ANN_DIR / split).mkdir(parents=True, exist_ok=True)
        records[split] = []
        for i in range(count):
            image, mask, placed = compose(rng, spec, backgrounds, pool, len(classes))
            name = f"{i:06d}"
            save = {"quality": 95, "subsampling": 0} if spec.fmt == "jpg" else {}
            Image.fromarray(image).save(out / IMG_DIR / split / f"{name}.{spec.fmt}", **save)
            Image.fromarray(mask).save(out / ANN_DIR / split / f"{name}.png")
            records[split].append({"image": name, "objects": placed})
            if split == "train":
                pixels += np.bincount(mask.ravel(), minlength=256)
    names = ["background", *classes]
    atomic_write_text(out / "classes.txt", "\n".join(names) + "\n")
    atomic_write_text(out / "objects.json", json.dumps(records) + "\n")
    total = max(int(pixels.sum()), 1)
    return {"folder": str(out), "classes": names, "images": {s: len(r) for s, r in records.items()},
            "size": spec.size, "format": spec.fmt,
            "background": str(background) if background is not None else None,
            "objects": [str(f) for f in folders] or None, "seed": seed,
            "train_pixels_percent": {n: round(100 * int(pixels[k]) / total, 2)
                                     for k, n in enumerate(names)}
                                    | {"ignore": round(100 * int(pixels[IGNORE_INDEX]) / total, 2)}}
