"""Evaluate a trained run folder on a split; prints the result as JSON.

Examples:
  vpeft eval --run runs/cifar10-lora                  # the run's data and evaluation split
  vpeft eval --run runs/cifar10-lora --split val200   # another split of the same data
  vpeft eval --run runs/cifar10-lora --data /elsewhere/cifar10 \\
             --weights /elsewhere/deit_tiny_patch16_224.fb_in1k.safetensors
  accelerate launch --multi_gpu --num_processes 2 -m vpeft.cli eval --run runs/cifar10-lora

The backbone is rebuilt from the run's config.yaml (model, weights, image size) and the adapter is
loaded into it; preprocessing is the same as in training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpeft.commands._common import at_least, check_weights_file, warn_if_training_data

HELP = "evaluate a trained run on a split (top-1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by vpeft train")
    p.add_argument("--data", metavar="DIR", help="data set folder (default: the run's)")
    p.add_argument("--split", help="split to evaluate (default: the run's evaluation split)")
    p.add_argument("--batch-size", type=at_least(1), metavar="N", help="default: the run's")
    p.add_argument("--weights", metavar="FILE",
                   help="backbone weights file (default: the run's), e.g. after moving machines")
    p.add_argument("--num-workers", type=at_least(0), metavar="N", help="data loader processes")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar (shown only on a terminal)")
    p.add_argument("--predictions", action="store_true",
                   help="include the predicted class of every image (in data set order)")
    p.add_argument("--output", metavar="FILE",
                   help="also write the JSON result to FILE (after printing it, so that a failed "
                        "write loses nothing)")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vpeft.core.checkpoint import atomic_write_text
    from vpeft.engine.evaluate import evaluate_run
    from vpeft.engine.rundir import CONFIG_FILE, RunDir

    run_dir = RunDir(args.run)
    saved = run_dir.read_config() if run_dir.file(CONFIG_FILE).is_file() else None
    check_weights_file(args.weights or (saved.weights if saved else None))
    if saved is not None:
        warn_if_training_data(saved.splits[0], args.split or saved.splits[1])
    result = evaluate_run(args.run, data=args.data, split=args.split, batch_size=args.batch_size,
                          weights=args.weights, num_workers=args.num_workers, cpu=args.cpu,
                          show_progress=args.progress, predictions=args.predictions)
    if PartialState().is_main_process:  # one answer, not one per process
        text = json.dumps(result, indent=2)
        print(text, flush=True)  # first: a failing --output must not lose the result
        if args.output:
            atomic_write_text(Path(args.output), text + "\n")
    return 0
