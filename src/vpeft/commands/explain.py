"""Explain a trained run: where the base and the adapted model look, and which added parameters
matter; writes PNG figures, maps.npz and summary.json into --out.

Examples:
  vpeft explain --run runs/cifar10-lora --images photos/ --out explain/cifar10-lora
  vpeft explain --run runs/cifar10-vpt --images a.png b.png --out explain/vpt --split val200
  vpeft explain --run runs/x --images photos/ --out explain/x --ig-steps 0    # faster

Per image: attention rollout and gradient-weighted rollout (token models with global attention;
Swin and CNNs say why not), Grad-CAM and Integrated Gradients, each for the base
model (backbone + the trained head) and the adapted model, and their difference. Per block and
module: update size ||dW||/||W||, added-output size, attention mass on prompt tokens, and with
--split the loss/top-1 change when one block's added modules are switched off.
"""

from __future__ import annotations

import argparse
import json

from vpeft.commands._common import at_least, check_weights_file

HELP = "explain a trained run: attention/gradient maps, which added parameters matter"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by vpeft train")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="an image folder, or image files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for figures and data")
    p.add_argument("--split", help="labelled split of the run's data for the ablation "
                                   "(e.g. val200); none: no ablation")
    p.add_argument("--data", metavar="DIR", help="data folder for --split (default: the run's)")
    p.add_argument("--limit", type=at_least(1), metavar="N",
                   help="use only the first N images of --split")
    p.add_argument("--ig-steps", type=at_least(0), default=16, metavar="N",
                   help="Integrated Gradients steps (0: skip IG); default 16")
    p.add_argument("--weights", metavar="FILE", help="backbone weights file (default: the run's)")
    p.add_argument("--no-figures", action="store_true",
                   help="write only maps.npz and summary.json (scoring many images)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vpeft.engine.rundir import CONFIG_FILE, RunDir
    from vpeft.explain import explain_run

    if not RunDir(args.run).file(CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{args.run} is not a vpeft run folder (no {CONFIG_FILE})")
    check_weights_file(args.weights)
    summary = explain_run(args.run, args.images, args.out, split=args.split, limit=args.limit,
                          ig_steps=args.ig_steps, weights=args.weights, data=args.data,
                          figures=not args.no_figures)
    short = {k: summary[k] for k in ("method", "figures", "absent") if k in summary}
    short["out"] = str(Path(args.out))
    print(json.dumps(short, indent=2))
    return 0
