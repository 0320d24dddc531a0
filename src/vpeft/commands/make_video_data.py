"""Generate a video task whose label needs motion (for tests, docs and benchmarks).

Examples:
  # 8 scroll directions of a CIFAR-10 mosaic, as mp4
  vpeft make-video-data --out data/motion --kind direction --source ../shared/data/vtab1k/cifar10

  # an image approaching or receding, as folders of PNG frames, 64 px
  vpeft make-video-data --out data/zoom --kind zoom --format frames --size 64

The folder gets classes.txt and train800 / val200 / train800val200 / test list files of
'<clip> <label>' lines; train on it with `vpeft train --task video --frames 8 ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpeft.commands._common import at_least

NAME = "make-video-data"
HELP = "generate a motion-labelled video task (mp4 or frame folders)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vpeft.data.synthetic_video import FORMATS, KINDS

    p.add_argument("--out", type=Path, required=True, help="folder to write (must be empty)")
    p.add_argument("--kind", choices=sorted(KINDS), default="direction",
                   help="what the label is (see vpeft.data.synthetic_video)")
    p.add_argument("--format", choices=FORMATS, default="mp4", dest="fmt")
    p.add_argument("--source", type=Path, help="VTAB-1k list-file folder whose images make the "
                                               "textures (default: random blocks)")
    p.add_argument("--size", type=at_least(8), default=64, help="frame side in pixels (even)")
    p.add_argument("--clips", type=at_least(1), nargs=3, default=(200, 50, 200),
                   metavar=("TRAIN800", "VAL200", "TEST"), help="clips per split")
    p.add_argument("--length", type=at_least(1), nargs=2, default=(12, 20),
                   metavar=("LOW", "HIGH"), help="frames per clip, drawn in [LOW, HIGH]")
    p.add_argument("--speed", type=float, default=2.0, help="pixels (or degrees) per frame")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from vpeft.data.synthetic_video import MotionSpec, make_motion_data

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} is not empty; choose a new folder")
    if args.source is not None and not (args.source / "train800val200.txt").is_file():
        raise ValueError(f"--source {args.source} has no train800val200.txt (a VTAB-1k folder)")
    spec = MotionSpec(kind=args.kind, size=args.size, length=tuple(args.length),
                      speed=args.speed, fmt=args.fmt)
    clips = dict(zip(("train800", "val200", "test"), args.clips, strict=True))
    print(json.dumps(make_motion_data(args.out, clips, spec, args.source, args.seed)))
    return 0
