"""Training step time of methods against a reference method, each run right after the reference.

    python benchmarks/step_vs_reference.py                   # lora vs hf-lora, DeiT-Tiny, batch 32
    python benchmarks/step_vs_reference.py --reference lora --methods dora --repeats 21

``vpeft profile`` gives each method's step time over the floor; this gives the direct ratio of two
methods (the issue's "vpeft lora over hf-lora"), with every candidate step timed right after a
reference step so that load drifting on a shared machine cancels (median over rounds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vpeft.bench.profile import ProfileSpec, batch, build, interleaved_times, train_step

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default="hf-lora")
    p.add_argument("--methods", nargs="+", default=["lora"])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    weights = str(args.weights) if args.weights.is_file() else None
    spec = ProfileSpec(model=args.model, weights=weights, batch_size=args.batch,
                       img_size=args.img, threads=args.threads, device=args.device)
    torch.set_num_threads(args.threads)
    x, y = batch(spec)
    steps = {m: train_step(build(spec, m), x, y) for m in [args.reference, *args.methods]}
    t = interleaved_times(steps, args.reference, args.warmup, args.repeats,
                          spec.resolved_device())
    result = {
        "reference": args.reference,
        "reference_step_ms": 1e3 * t.median(args.reference),
        "device": str(spec.resolved_device()),
        "threads": args.threads,
        "batch": args.batch,
        "img": args.img,
        "repeats": args.repeats,
        "methods": {m: {"step_ms": 1e3 * t.median(m), "ratio": t.ratio(m)} for m in args.methods},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
