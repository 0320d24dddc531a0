"""Training-step ratios to the floor, interleaved, without `vpeft profile`'s latency part.

    PYTHONPATH=src python benchmarks/steps.py lora,ssf,fact-tt,fact-tk,repadapter 2

DeiT-Tiny (real weights from ../shared), batch 32, 224 px, 2 threads; 1 warm-up round, then the
given number of timed rounds (default 3), each method's step right after a floor step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vpeft.bench.profile import (
    ProfileSpec,
    batch,
    build,
    floor_step,
    interleaved_times,
    train_step,
)

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def main() -> None:
    torch.set_num_threads(2)
    methods = sys.argv[1].split(",")
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    spec = ProfileSpec(batch_size=32,
                       weights=str(WEIGHTS / "deit_tiny_patch16_224.fb_in1k.safetensors"))
    x, y = batch(spec)
    steps = {"floor": floor_step(build(spec), x, y)}
    for m in methods:
        steps[m] = train_step(build(spec, m), x, y)
    t = interleaved_times(steps, "floor", 1, repeats, torch.device("cpu"))
    print("floor ms", round(1e3 * t.median("floor")))
    for m in methods:
        print(m, "ratio", round(t.ratio(m), 3), "rounds", [round(r, 3) for r in t.ratios[m]])


if __name__ == "__main__":
    main()
