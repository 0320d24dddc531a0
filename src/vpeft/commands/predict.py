"""Predict the classes of image files with a trained run; writes a CSV of the top-k labels.

Examples:
  vpeft predict --run runs/cifar10-lora --images photos/ --out preds.csv
  vpeft predict --run runs/cifar10-lora --images a.png b.jpg --out preds.csv --top-k 3

Folders are searched recursively for image files. Preprocessing is the run's evaluation's (its
model's data config at its image size); class names come from the run's classes.txt. The CSV has
one row per image: ``image, label_1, probability_1, ..., label_k, probability_k``. An existing
--out is never replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpeft.commands._common import at_least, check_weights_file

HELP = "predict the top-k classes of image files with a trained run (CSV)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by vpeft train")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE", help="CSV file to write")
    p.add_argument("--top-k", type=at_least(1), default=5, metavar="K",
                   help="labels per image (default: 5, at most the run's classes)")
    p.add_argument("--batch-size", type=at_least(1), default=32, metavar="N")
    p.add_argument("--num-workers", type=at_least(0), metavar="N", help="data loader processes")
    p.add_argument("--weights", metavar="FILE", help="backbone weights file (default: the run's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar (shown only on a terminal)")


def run(args: argparse.Namespace) -> int:
    import csv
    import io
    import logging
    import sys

    import torch
    from tqdm.auto import tqdm

    from vpeft.core.checkpoint import atomic_write_text
    from vpeft.engine.evaluate import load_run
    from vpeft.engine.runtime import make_loader
    from vpeft.serve.predict import (
        class_names,
        find_images,
        image_files_dataset,
        run_transform,
        top_k,
    )

    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another "
                              "--out")
    files = find_images(args.images)
    check_weights_file(args.weights)
    model, config, classes = load_run(args.run, args.weights)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model.to(device).eval()
    names = class_names(classes, getattr(model, "num_classes", 0) or len(classes or []))
    dataset = image_files_dataset(files, names)
    dataset.transform = run_transform(model, config)
    loader = make_loader(dataset, args.batch_size, args.num_workers)
    k = min(args.top_k, len(names))
    rows, done = [], 0
    show = args.progress and sys.stderr.isatty()
    with torch.inference_mode():
        for images, _ in tqdm(loader, desc="predict", unit="batch", disable=not show, leave=False):
            for logits in model(images.to(device)):
                row = [str(files[done])]
                for p in top_k(logits, names, k):
                    row += [p["label"], f"{p['probability']:.6f}"]
                rows.append(row)
                done += 1
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image"] + [f"{c}_{i}" for i in range(1, k + 1)
                                 for c in ("label", "probability")])
    writer.writerows(rows)
    atomic_write_text(out, text.getvalue())
    logging.getLogger(__name__).info("wrote %d predictions (%s, top-%d) to %s", len(rows),
                                     config.method, k, out)
    return 0
