"""A localisation check an explanation can fail: squares on noise, and the pointing game.

Each image is grey noise with one small square at a random place, half white and half black; the
label is which half is white (0: top, 1: left, 2: the top-left and bottom-right quarters). Every
class has the same number of white and black pixels, so no global statistic of the image tells the
class: a model can only be right by finding the object. The pointing game (Zhang et al., 2016)
counts the images whose map peaks inside the object's box; a map that ignores the object scores
about the box's area fraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vpeft.data import write_list_split

SHAPES = ("top half", "left half", "diagonal quarters")


def shape_images(n: int, size: int = 64, obj: int = 16, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` RGB uint8 images (N, size, size, 3), labels (N,), boxes (N, 4) as
    ``(top, left, bottom, right)`` with bottom/right exclusive."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.5, 0.15, (n, size, size)).clip(0, 1)
    labels = rng.integers(0, len(SHAPES), n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    h = obj // 2
    for i in range(n):
        r, c = rng.integers(0, size - obj + 1, 2)
        shape = np.zeros((obj, obj), dtype=bool)
        if labels[i] == 0:
            shape[:h] = True
        elif labels[i] == 1:
            shape[:, :h] = True
        else:
            shape[:h, :h] = shape[h:, h:] = True
        region = images[i, r:r + obj, c:c + obj]
        region[shape], region[~shape] = 1.0, 0.0
        boxes[i] = (r, c, r + obj, c + obj)
    rgb = np.repeat((images * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    return rgb, labels, boxes


def write_shapes_dataset(root: str | Path, sizes: dict[str, int] | None = None, size: int = 64,
                         obj: int = 16) -> Path:
    """A VTAB-1k style folder of :func:`shape_images` (``images/<split>/NNNNNN.png``,
    ``<split>.txt``, ``classes.txt``) plus ``boxes_<split>.npy``, trainable by ``vpeft train``."""
    root = Path(root)
    sizes = sizes or {"train800": 800, "val200": 200, "test": 200}
    for k, (split, n) in enumerate(sizes.items()):
        images, labels, boxes = shape_images(n, size, obj, seed=k)
        write_list_split(root, split, images, labels)
        np.save(root / f"boxes_{split}.npy", boxes)
    if "train800" in sizes and "val200" in sizes:
        (root / "train800val200.txt").write_text(
            (root / "train800.txt").read_text() + (root / "val200.txt").read_text())
    (root / "classes.txt").write_text("".join(s.replace(" ", "_") + "\n" for s in SHAPES))
    return root


def pointing_game(maps: torch.Tensor | np.ndarray, boxes: np.ndarray) -> float:
    """Fraction of maps (N, H, W), at the images' resolution, whose maximum lies in its box."""
    maps = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps)
    w = maps.shape[-1]
    peaks = maps.flatten(1).argmax(dim=1)
    rows, cols = (peaks // w).numpy(), (peaks % w).numpy()
    inside = ((boxes[:, 0] <= rows) & (rows < boxes[:, 2])
              & (boxes[:, 1] <= cols) & (cols < boxes[:, 3]))
    return float(inside.mean())


def area_fraction(boxes: np.ndarray, height: int, width: int) -> float:
    """Mean share of the image the boxes cover: the pointing score of a map that ignores them."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return float(areas.mean() / (height * width))


def pointing_scores(out: str | Path, data: str | Path, split: str) -> dict[str, float]:
    """Pointing-game score of every map in ``out/maps.npz`` (written by ``vpeft explain`` on
    images of ``split`` of a :func:`write_shapes_dataset` folder ``data``), by ``kind/model``,
    plus ``area_fraction`` (the score of a map that ignores the objects)."""
    data = Path(data)
    boxes = np.load(data / f"boxes_{split}.npy")
    scores: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    size = None
    with np.load(Path(out) / "maps.npz") as maps:
        for key in maps.files:
            name, kind, model = key.rsplit("/", 2)
            if model == "diff" or kind == "prompts":
                continue
            index = int(Path(name).stem)  # images/<split>/NNNNNN.png
            scores.setdefault(f"{kind}/{model}", []).append((maps[key], boxes[index]))
            size = maps[key].shape
    out_scores = {k: pointing_game(np.stack([m for m, _ in v]), np.stack([b for _, b in v]))
                  for k, v in sorted(scores.items())}
    if size is not None:
        out_scores["area_fraction"] = area_fraction(boxes, *size)
    return out_scores


def main(argv: list[str] | None = None) -> None:
    """``python -m vpeft.explain.localisation make DIR [SIZE OBJ]`` writes a shapes data set;
    ``... score OUT DATA SPLIT`` prints the pointing-game scores of ``OUT/maps.npz``."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["make"] and len(args) in (2, 4):
        extra = [int(a) for a in args[2:]]
        print(write_shapes_dataset(args[1], None, *extra))
    elif args[:1] == ["score"] and len(args) == 4:
        print(json.dumps(pointing_scores(args[1], args[2], args[3]), indent=2))
    else:
        raise SystemExit("usage: python -m vpeft.explain.localisation make DIR [SIZE OBJ] | "
                         "score OUT DATA SPLIT")


if __name__ == "__main__":
    main()
