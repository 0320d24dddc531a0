"""LoRA on one ConvNeXt-T block's MLP (fc1, fc2, rank 8) against the frozen block's floor.

    python benchmarks/lora_convnext_block.py --stage 0     # C = 96 at 56 x 56, batch 32
    python benchmarks/lora_convnext_block.py --stage 2     # C = 384 at 14 x 14

The block's step (forward plus backward to its input; LoRA's factors get gradients) timed right
after the frozen block's, medians of the ratios of adjacent pairs: where the whole model's LoRA
step ratio comes from, in a fraction of the time of ``vpeft profile``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

from vpeft.methods.partial.lora import LoRALinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = timm.create_model("convnext_tiny").stages[args.stage].blocks[1].requires_grad_(False)
    lora = copy.deepcopy(block)
    for name in ("fc1", "fc2"):
        base = getattr(lora.mlp, name)
        layer = LoRALinear(base, 8, 1.0, 0.0, [(0, base.out_features)])
        nn.init.normal_(layer.lora_B, std=0.01)
        setattr(lora.mlp, name, layer)
    side = 56 >> args.stage
    x = torch.randn(args.batch, block.norm.normalized_shape[0], side, side)

    def timed(module: nn.Module) -> float:
        t0 = time.perf_counter()
        module(x.detach().requires_grad_(True)).sum().backward()
        return time.perf_counter() - t0

    for _ in range(2):
        timed(block), timed(lora)
    pairs = [(timed(block), timed(lora)) for _ in range(args.repeats)]
    floor = statistics.median(f for f, _ in pairs)
    ratio = statistics.median(t / f for f, t in pairs)
    print(f"stage {args.stage}: floor {1e3 * floor:.0f} ms, LoRA step x floor {ratio:.3f}")


if __name__ == "__main__":
    main()
