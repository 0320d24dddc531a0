"""Peak training memory of the side-tuning methods against LoRA and full fine-tuning.

    python benchmarks/memory.py                      # lst, lora, full: DeiT-Tiny, batch 32, 224 px
    python benchmarks/memory.py --methods lst side-tune vqt lora full --device cuda

Each method is measured in a fresh subprocess by :func:`vpeft.bench.profile.peak_memory_mb`: the
memory that two training steps add on top of the loaded model, optimiser and batch (activations
kept for backward, gradients, optimiser state, temporaries). ``vpeft profile`` reports the same
figure for every method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpeft.bench.profile import ProfileSpec, peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lst", "lora", "full"])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    spec = ProfileSpec(model=args.model, weights=str(args.weights), batch_size=args.batch,
                       img_size=args.img, device=args.device, threads=args.threads)
    results = {m: peak_memory_mb(spec, m, {}) for m in args.methods}
    full = results.get("full", {}).get("train_memory_mb")
    measure = next(iter(results.values()))["memory_measure"]
    print(f"{args.model}, batch {args.batch}, {args.img} px, {args.device}; training memory = "
          f"peak during two steps - memory before them ({measure})")
    print(f"{'method':<12} {'train MiB':>10} {'vs full':>8} {'process peak MiB':>17}")
    for m, r in results.items():
        ratio = f"{r['train_memory_mb'] / full:.1%}" if full else "-"
        print(f"{m:<12} {r['train_memory_mb']:>10.1f} {ratio:>8} {r['peak_memory_mb']:>17.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
