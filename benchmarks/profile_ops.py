"""Which operations a method's training step adds over the floor, by ``torch.profiler``.

    python benchmarks/profile_ops.py --method lora            # DeiT-Tiny, batch 32, 2 threads
    python benchmarks/profile_ops.py --method fact-tt --top 30 --by-name  # per op, shapes summed
    python benchmarks/profile_ops.py --blas                   # rank-r product orientations

Self CPU time per op (and input shapes) summed over ``--steps`` steps of the method and of the
floor (frozen forward + backward to the first block's input), largest difference first: where a
method's overhead goes. ``--blas`` times the products a rank-r factor's gradient can be computed
with (``g^T u`` against ``(u^T g)^T``), which differ several-fold on CPU BLAS at small r.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from vpeft.bench.profile import ProfileSpec, batch, build, floor_step, train_step

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"


def op_times(step, steps: int) -> collections.Counter:
    step()
    step()
    total: collections.Counter = collections.Counter()
    for _ in range(steps):
        with profile(record_shapes=True) as prof:
            step()
        for e in prof.key_averages(group_by_input_shape=True):
            total[(e.key, str(e.input_shapes)[:70])] += e.self_cpu_time_total / 1e3 / steps
    return total


def by_name(times: collections.Counter) -> collections.Counter:
    """The same times with every input shape of an op added together."""
    total: collections.Counter = collections.Counter()
    for (name, _), ms in times.items():
        total[(name, "")] += ms
    return total


def median_ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def blas(rows: int) -> None:
    print(f"{'D':>5} {'r':>4} {'g^T u ms':>10} {'(u^T g)^T ms':>14}")
    for d, r in [(192, 8), (192, 16), (192, 64), (768, 8), (768, 64)]:
        g, u = torch.randn(rows, d), torch.randn(rows, r)
        slow, fast = median_ms(lambda g=g, u=u: g.t() @ u), median_ms(lambda g=g, u=u: u.t() @ g)
        print(f"{d:>5} {r:>4} {slow:>10.3f} {fast:>14.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--blas", action="store_true", help="time rank-r gradient orientations only")
    p.add_argument("--by-name", action="store_true", help="sum each op's shapes together")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.blas:
        blas(rows=args.batch * 197)
        return
    weights = str(args.weights) if args.weights.is_file() else None
    spec = ProfileSpec(model=args.model, weights=weights, batch_size=args.batch,
                       img_size=args.img, device="cpu")
    x, y = batch(spec)
    method = op_times(train_step(build(spec, args.method), x, y), args.steps)
    floor = op_times(floor_step(build(spec), x, y), args.steps)
    if args.by_name:
        method, floor = by_name(method), by_name(floor)
    print(f"per step: {args.method} {sum(method.values()):.0f} ms of ops, "
          f"floor {sum(floor.values()):.0f} ms")
    print(f"{'+ms':>8} {args.method:>10} {'floor':>8}  op  shapes")
    diffs = sorted(((method[k] - floor[k], k) for k in method.keys() | floor.keys()), reverse=True)
    for diff, (name, shapes) in diffs[: args.top]:
        print(f"{diff:>8.1f} {method[(name, shapes)]:>10.1f} {floor[(name, shapes)]:>8.1f}  "
              f"{name}  {shapes}")


if __name__ == "__main__":
    main()
