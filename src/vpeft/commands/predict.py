"""Predict with a trained run: a CSV of the top-k labels of image files, or (segmentation runs)
a mask and a colour overlay per image.

Examples:
  vpeft predict --run runs/cifar10-lora --images photos/ --out preds.csv
  vpeft predict --run runs/cifar10-lora --images a.png b.jpg --out preds.csv --top-k 3
  vpeft predict --run runs/seg-lora --images photos/ --out masks/

A segmentation run writes ``<name>.png`` (pixel values: class indices, with a palette) and
``<name>_overlay.png`` into the --out folder, at each image's own size.

Folders are searched recursively for image files. Preprocessing is the run's evaluation's (its
model's data config at its image size); class names come from the run's classes.txt. The CSV has
one row per image: ``image, label_1, probability_1, ..., label_k, probability_k``. An existing
--out is never replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpeft.commands._common import at_least, check_weights_file

HELP = "predict with a trained run: top-k classes (CSV) or segmentation masks (PNG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by vpeft train")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="CSV file to write (segmentation runs: folder for the masks)")
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
    from vpeft.tasks import make_task

    out = Path(args.out)
    check_weights_file(args.weights)
    model, config, classes = load_run(args.run, args.weights)
    task = make_task(config.task, **config.task_options())
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if task.predicts == "masks":
        return write_mask_files(args, model, config, task, out, device)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another "
                              "--out")
    files = find_images(args.images)
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


def write_mask_files(args: argparse.Namespace, model, config, task, out: Path, device) -> int:
    """Masks and overlays of a segmentation run's predictions, into the folder ``out``."""
    import json
    import logging

    from vpeft.data import data_config
    from vpeft.serve.predict import find_images
    from vpeft.tasks.masks import write_masks

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; a segmentation run writes a folder")
    files = find_images(args.images)
    cfg = data_config(model, config.img_size)
    written = write_masks(model, task, files, out, task.transforms(cfg)[1],
                          cfg["input_size"][-1], model.num_classes, args.overwrite, device)
    logging.getLogger(__name__).info("wrote %d masks and overlays (%s) to %s", len(written),
                                     config.method, out)
    print(json.dumps({"images": len(written), "out": str(out)}))
    return 0
