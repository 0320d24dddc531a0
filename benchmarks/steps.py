"""Training-step ratios to the floor (and training memory) of many methods on one backbone.

    PYTHONPATH=src python benchmarks/steps.py --methods lora ssf fact-tt --rounds 2
    PYTHONPATH=src python benchmarks/steps.py --model swin_tiny_patch4_window7_224 --all \\
        --memory --json swin.json
    PYTHONPATH=src python benchmarks/steps.py --reference hf:lora --methods lora --rounds 15 \\
        --method-args "hf:lora:target_modules=[qkv]"       # lora right after hf:lora on qkv

The lean form of `vpeft profile` for long lists on slow backbones: no inference latency, and one
model in memory at a time. For each method: one untimed step, then ``--rounds`` pairs of a floor
step and the method's step right after it (the ratio is the median over pairs, so load that
drifts cancels); with ``--memory`` also the training memory of a fresh subprocess per method,
the figure `vpeft profile` reports. The steps are `vpeft profile`'s own (``train_step``,
``floor_step``); ``--reference`` times against another method's step instead. The FLOPs
column is each step's FLOPs (PyTorch's counter) over the reference's: the ratio a compute-bound
device would show. Defaults: DeiT-Tiny with the real weights from ../shared when present, batch
32, 224 px, 2 threads. ``--all`` takes every registered method and lists the ones that do not
apply to the backbone (their ``MissingPartError``) instead of stopping.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vpeft.backbones.base import MissingPartError
from vpeft.bench.flops import step_flops
from vpeft.bench.profile import (
    ProfileSpec,
    batch,
    build,
    floor_step,
    interleaved_times,
    peak_memory_mb,
    train_step,
)
from vpeft.engine.config import parse_kv
from vpeft.registry import list_methods

DEIT = Path(__file__).resolve().parents[2] / "shared" / "weights" / \
    "deit_tiny_patch16_224.fb_in1k.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--weights", help="local weights (default: the real DeiT-Tiny for DeiT-Tiny)")
    p.add_argument("--methods", nargs="+", default=[])
    p.add_argument("--all", action="store_true", help="every registered method")
    p.add_argument("--method-args", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                   help="options of one method, e.g. lora:targets=[fc1,fc2]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed pairs (0: memory only)")
    p.add_argument("--reference", help="a method to time against instead of the floor, e.g. "
                   "hf:lora (with --method-args hf:lora:target_modules=[qkv])")
    p.add_argument("--memory", action="store_true", help="also training memory (subprocess)")
    p.add_argument("--json", type=Path, help="write the rows here (after every method)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or (str(DEIT) if args.model == "deit_tiny_patch16_224"
                               and DEIT.exists() else None)
    spec = ProfileSpec(model=args.model, weights=weights, batch_size=args.batch_size,
                       img_size=args.img_size, threads=args.threads)
    options: dict[str, dict[str, Any]] = {}
    for item in args.method_args:
        head, _, value = item.partition("=")  # the name may hold a colon: hf:lora:r=8
        name, _, key = head.rpartition(":")
        options.setdefault(name, {}).update(parse_kv(f"{key}={value}"))
    names = [m.name for m in list_methods()] if args.all else args.methods
    x, y = batch(spec)
    ref = args.reference or "floor"
    floor = (train_step(build(spec, ref, **options.get(ref, {})), x, y) if args.reference
             else floor_step(build(spec), x, y))
    floor_flops = step_flops(floor) if args.rounds else 0.0
    rows: dict[str, Any] = {"spec": vars(args) | {"json": str(args.json), "weights": weights},
                            "methods": {}, "skipped": {}}
    print(f"{args.model}, batch {args.batch_size}, {args.img_size} px, {args.threads} threads; "
          f"ratios to {ref}")
    print(f"{'method':<14} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'FLOPs x':>8} "
          f"{'train MB':>9}  rounds")
    for name in names:
        try:
            model = build(spec, name, **options.get(name, {}))
        except MissingPartError as e:
            rows["skipped"][name] = str(e)
            print(f"{name:<14} not applicable: {e}")
            continue
        row: dict[str, Any] = {"options": options.get(name, {})}
        if args.rounds:  # --rounds 0: memory only
            step = train_step(model, x, y)
            flops = step_flops(step)  # also the untimed first step
            t = interleaved_times({ref: floor, name: step}, ref, 0, args.rounds,
                                  torch.device("cpu"))
            del step
            row.update(step_ms=1e3 * t.median(name), floor_ms=1e3 * t.median(ref),
                       ratio=t.ratio(name), rounds=t.ratios[name],
                       flops_ratio=flops / floor_flops)
        del model
        if args.memory:
            row.update(peak_memory_mb(spec, name, options.get(name, {})))
        rows["methods"][name] = row
        cells = [f"{row[k]:{w}.{d}f}" if k in row else f"{'-':>{w}}" for k, w, d in
                 (("step_ms", 9, 0), ("floor_ms", 9, 0), ("ratio", 8, 3), ("flops_ratio", 8, 3),
                  ("train_memory_mb", 9, 0))]
        print(f"{name:<14} {' '.join(cells)}  {[round(r, 3) for r in row.get('rounds', [])]}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    rows["floor_gflops_per_image"] = floor_flops / args.batch_size / 1e9 if args.rounds else None
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.memory:
        floor_mb = peak_memory_mb(spec, None, {})["train_memory_mb"]
        rows["floor_memory_mb"] = floor_mb
        print(f"floor training memory {floor_mb:.0f} MB")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
