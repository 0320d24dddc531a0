"""Generate a semantic segmentation task: objects pasted onto backgrounds, with per-pixel masks.

Examples:
  # MNIST digits and Fashion-MNIST items on CIFAR-10 images, 128 px, 21 classes with background
  vpeft make-seg-data --out data/seg --background ../shared/data/vtab1k/cifar10 \
      --objects ../shared/data/vtab1k/mnist ../shared/data/vtab1k/fashion_mnist

  # a small task: 4 digit classes (+ background) at 64 px
  vpeft make-seg-data --out data/seg4 --background ../shared/data/vtab1k/cifar10 \
      --objects ../shared/data/vtab1k/mnist --max-classes 4 --size 64

  # no sources: drawn shapes on random colour blocks
  vpeft make-seg-data --out data/shapes --images 40 10 20

The folder holds img_dir/<split>/*.jpg, ann_dir/<split>/*.png (class index per pixel, 0 =
background, 255 = ignore), classes.txt and objects.json, splits train / val / test; train on it
with `vpeft train --task segmentation ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpeft.commands._common import at_least

NAME = "make-seg-data"
HELP = "generate a segmentation task (objects pasted onto backgrounds, with masks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vpeft.data.synthetic_seg import FORMATS

    p.add_argument("--out", type=Path, required=True, help="folder to write (must be empty)")
    p.add_argument("--background", type=Path, metavar="DIR",
                   help="VTAB-1k list-file folder of backgrounds, e.g. cifar10 (default: random "
                        "colour blocks)")
    p.add_argument("--objects", type=Path, nargs="+", metavar="DIR",
                   help="VTAB-1k list-file folders of gray objects, e.g. mnist fashion_mnist; "
                        "classes are '<folder>:<class>' (default: drawn shapes)")
    p.add_argument("--size", type=at_least(8), default=128, help="image side in pixels")
    p.add_argument("--images", type=at_least(1), nargs=3, default=(400, 100, 200),
                   metavar=("TRAIN", "VAL", "TEST"), help="images per split")
    p.add_argument("--max-classes", type=at_least(1), metavar="N",
                   help="use only the first N object classes")
    p.add_argument("--objects-per-image", type=at_least(1), nargs=2, default=(1, 3),
                   metavar=("LOW", "HIGH"), help="objects per image, drawn in [LOW, HIGH]")
    p.add_argument("--object-scale", type=float, nargs=2, default=(0.25, 0.5),
                   metavar=("LOW", "HIGH"), help="object side / image side, drawn in [LOW, HIGH]")
    p.add_argument("--format", choices=FORMATS, default="jpg", dest="fmt",
                   help="image files (masks are PNG)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from vpeft.data.synthetic_seg import SegSpec, make_seg_data

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"{args.out} is not an empty folder; choose a new one")
    spec = SegSpec(size=args.size, objects=tuple(args.objects_per_image),
                   scale=tuple(args.object_scale), max_classes=args.max_classes, fmt=args.fmt)
    images = dict(zip(("train", "val", "test"), args.images, strict=True))
    print(json.dumps(make_seg_data(args.out, images, spec, args.background, args.objects,
                                   args.seed)))
    return 0
