"""A generated video task whose label needs motion, not appearance.

Each clip shows a texture that wraps around the frame: a mosaic of real images (the images of a
VTAB-1k list-file folder such as ``mnist`` or ``cifar10``) or, without one, random blocks.

* ``direction`` (8 classes): the texture scrolls one of 8 ways (right, down-right, ... up-right)
  by ``speed`` pixels a frame, from a random start offset; ``direction4``: the 4 axis-aligned
  ways only. Every frame is the same texture at
  a uniformly random shift whatever the class, and a clip of one direction played backwards is
  a clip of the opposite one: frame order alone tells the classes apart.
* ``sense`` (2 classes): one image (``3/8`` of the frame) crosses a black frame rightwards
  (right, down-right or up-right) or leftwards (the mirror ways), from a random start that
  keeps it inside. Both classes move along the same three axes, so the axis tells nothing;
  the easiest of the three to learn.
* ``zoom`` (2 classes): one image grows (approaching) or shrinks (receding) between 1/4 and
  the whole of the frame, about a random centre; backwards, one class is the other.
* ``rotation`` (2 classes): the mosaic turns clockwise or anticlockwise by ``speed`` degrees a
  frame from a random start angle; backwards, one class is the other.

So a model that pools frame features before comparing frames (mean pooling, as the frame-wise
baselines do) has no signal beyond chance; a model that relates frames over time does. Clips are
written as mp4 (H.264, near-lossless) or as folders of PNG frames, with VTAB-1k style list files
``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt`` and ``classes.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpeft.core.checkpoint import atomic_write_text

DIRECTIONS = {  # name -> (dy, dx) per frame, in units of `speed`
    "right": (0, 1), "down-right": (1, 1), "down": (1, 0), "down-left": (1, -1),
    "left": (0, -1), "up-left": (-1, -1), "up": (-1, 0), "up-right": (-1, 1),
}
KINDS = {"direction": list(DIRECTIONS), "direction4": ["right", "down", "left", "up"],
         "sense": ["rightwards", "leftwards"], "zoom": ["approaching", "receding"],
         "rotation": ["clockwise", "anticlockwise"]}
SENSE_WAYS = (("right", "down-right", "up-right"), ("left", "down-left", "up-left"))
FORMATS = ("mp4", "frames")


@dataclass
class MotionSpec:
    """What to generate (see the module docstring)."""

    kind: str = "direction"
    size: int = 64  # frame side in pixels (even, for H.264)
    length: tuple[int, int] = (12, 20)  # frames per clip, drawn uniformly in [low, high]
    speed: float = 2.0  # pixels (direction) or degrees (rotation) per frame
    tiles: int = 2  # the mosaic is tiles x tiles images
    fmt: str = "mp4"
    fps: int = 8

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.size < 8 or self.size % 2:
            raise ValueError(f"size must be an even number >= 8, got {self.size}")
        if not 1 <= self.length[0] <= self.length[1]:
            raise ValueError(f"length must be 1 <= low <= high, got {self.length}")
        if self.tiles < 1 or self.speed <= 0:
            raise ValueError("tiles must be >= 1 and speed > 0")


def source_images(folder: str | Path, split: str) -> list[Path]:
    """The image paths of a VTAB-1k list file ``folder/<split>.txt``."""
    folder = Path(folder)
    lines = (folder / f"{split}.txt").read_text().split("\n")
    return [folder / line.rsplit(maxsplit=1)[0] for line in lines if line.strip()]


def mosaic(rng: np.random.Generator, spec: MotionSpec, pool: list[Path]) -> np.ndarray:
    """A ``size x size x 3`` texture: ``tiles x tiles`` images from ``pool``, or random blocks."""
    tile = -(-spec.size // spec.tiles)
    rows = []
    for _ in range(spec.tiles):
        row = []
        for _ in range(spec.tiles):
            if pool:
                with Image.open(pool[rng.integers(len(pool))]) as img:
                    row.append(np.asarray(img.convert("RGB").resize((tile, tile))))
            else:
                blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                row.append(np.asarray(Image.fromarray(blocks).resize((tile, tile))))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)[: spec.size, : spec.size]


def render(rng: np.random.Generator, spec: MotionSpec, label: int,
           texture: np.ndarray) -> list[np.ndarray]:
    """The frames of one clip of class ``label``."""
    n = int(rng.integers(spec.length[0], spec.length[1] + 1))
    if spec.kind == "sense":
        return _crossing(rng, spec, label, texture, n)
    if spec.kind == "zoom":
        return _zoom(rng, spec, label, texture, n)
    if spec.kind.startswith("direction"):
        dy, dx = DIRECTIONS[KINDS[spec.kind][label]]
        oy, ox = rng.integers(spec.size, size=2)
        return [np.roll(texture, (round(oy + t * dy * spec.speed),
                                  round(ox + t * dx * spec.speed)), axis=(0, 1))
                for t in range(n)]
    sign = -1.0 if label == 0 else 1.0  # PIL turns anticlockwise for positive angles
    start = rng.uniform(0, 360)
    img = Image.fromarray(texture)
    return [np.asarray(img.rotate(start + sign * t * spec.speed, Image.Resampling.BILINEAR))
            for t in range(n)]


def _crossing(rng: np.random.Generator, spec: MotionSpec, label: int, texture: np.ndarray,
              n: int) -> list[np.ndarray]:
    """An object (``texture`` shrunk to 3/8 of the side) crossing a black frame."""
    side = max(2, spec.size * 3 // 8)
    obj = np.asarray(Image.fromarray(texture).resize((side, side)))
    dy, dx = DIRECTIONS[SENSE_WAYS[label][rng.integers(3)]]
    room = spec.size - side  # free pixels along each axis
    step = min(spec.speed, room / max(n - 1, 1))  # pixels per frame, kept inside the frame
    span = step * (n - 1)
    y0, x0 = (rng.uniform(0, room - span * abs(d)) + (span if d < 0 else 0) for d in (dy, dx))
    frames = []
    for t in range(n):
        y, x = round(y0 + dy * step * t), round(x0 + dx * step * t)
        frame = np.zeros((spec.size, spec.size, 3), np.uint8)
        frame[y:y + side, x:x + side] = obj
        frames.append(frame)
    return frames


def _zoom(rng: np.random.Generator, spec: MotionSpec, label: int, texture: np.ndarray,
          n: int) -> list[np.ndarray]:
    """``texture`` growing (label 0) or shrinking (1) between 1/4 and all of the frame side."""
    lo, hi = max(2, spec.size // 4), spec.size
    sides = np.linspace(lo, hi, n) if label == 0 else np.linspace(hi, lo, n)
    cy, cx = rng.uniform(0.25, 0.75, size=2) * spec.size
    img = Image.fromarray(texture)
    frames = []
    for side in sides:
        s = round(side)
        y = round(min(max(cy - s / 2, 0), spec.size - s))
        x = round(min(max(cx - s / 2, 0), spec.size - s))
        frame = np.zeros((spec.size, spec.size, 3), np.uint8)
        frame[y:y + s, x:x + s] = np.asarray(img.resize((s, s)))
        frames.append(frame)
    return frames


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """H.264 (yuv444p, crf 4: near-lossless) video of RGB ``frames``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "4"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"  # full colour resolution (small frames)
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames, start=1):
        Image.fromarray(f).save(folder / f"{t:06d}.png")


def make_motion_data(out: str | Path, clips: dict[str, int] | None = None,
                     spec: MotionSpec | None = None, source: str | Path | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Write a motion-labelled video task to ``out`` (see the module docstring).

    ``clips`` gives the clips of each split (default ``train800: 200, val200: 50, test: 200``);
    ``train800val200`` lists the clips of both. ``source``: a VTAB-1k folder whose images make
    the textures (its ``train800val200`` images for training clips, ``test`` images for the
    test clips); none: random blocks. Classes are balanced in each split.
    """
    spec = spec or MotionSpec()
    spec.validate()
    clips = clips or {"train800": 200, "val200": 50, "test": 200}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = KINDS[spec.kind]
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {}
    for split, count in clips.items():
        pool = []
        if source is not None:
            pool = source_images(source, "test" if split == "test" else "train800val200")
        labels = rng.permutation(np.arange(count) % len(classes))
        lines[split] = []
        for i, label in enumerate(labels):
            frames = render(rng, spec, int(label), mosaic(rng, spec, pool))
            rel = (f"videos/{split}/{i:06d}.mp4" if spec.fmt == "mp4"
                   else f"frames/{split}/{i:06d}")
            if spec.fmt == "mp4":
                write_mp4(out / rel, frames, spec.fps)
            else:
                write_frames(out / rel, frames)
            lines[split].append(f"{rel} {int(label)}")
    if "train800" in lines and "val200" in lines:
        lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        atomic_write_text(out / f"{split}.txt", "\n".join(rows) + "\n")
    atomic_write_text(out / "classes.txt", "\n".join(classes) + "\n")
    return {"folder": str(out), "kind": spec.kind, "classes": classes,
            "clips": {s: len(r) for s, r in lines.items()}, "format": spec.fmt,
            "size": spec.size, "source": str(source) if source else None, "seed": seed}
