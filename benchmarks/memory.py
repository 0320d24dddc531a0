"""Peak training memory of side-tuning methods against LoRA and full fine-tuning.

    python benchmarks/memory.py            # lst, lora, full on DeiT-Tiny, batch 32, 224 px, CPU
    python benchmarks/memory.py --methods lst side-tune vqt lora full --device cuda

Each method runs in a fresh subprocess (this script with ``--worker``), so no method inherits
another's allocator state. The worker builds the model, adapts it, creates AdamW and the batch,
then takes a *baseline* and runs ``--steps`` training steps (forward, backward, optimizer step).
What is reported is the peak during those steps minus the baseline: the memory that training
adds on top of the loaded model, i.e. activations kept for the backward pass, gradients,
optimizer state and temporaries. Weights, the Python/torch runtime and the input batch are in
the baseline and cancel out.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the baseline (exact tensor bytes).
* CPU: the process's resident set. The peak (``VmHWM``) is reset through ``/proc/self/clear_refs``
  at the baseline, and glibc is told to serve blocks over 64 KiB with ``mmap``
  (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the peak
  tracks live memory. Where the reset is not allowed, the whole-process peak
  (``getrusage``) is used and the column says so. RSS counts pages, so CPU figures are accurate
  to a few MiB; the process peak (``RUSAGE_CHILDREN`` of each worker) is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
MiB = 2**20


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """Build, adapt, then measure ``args.steps`` training steps of one method."""
    import timm
    import torch
    import torch.nn.functional as F

    import vpeft

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(args.weights)))
    vpeft.adapt(model, args.method)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, how = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
    else:
        baseline = rss_kib("VmRSS") * 1024
        how = "cpu VmHWM (reset)" if reset_peak_rss() else "cpu ru_maxrss (not reset)"
    for _ in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif how.endswith("(reset)"):
        peak = rss_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = vpeft.summary(model)
    return {"method": args.method, "train_mib": (peak - baseline) / MiB,
            "baseline_mib": baseline / MiB, "measure": how,
            "trainable": summary.trainable, "loss": float(loss)}


def run_worker(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--model", args.model,
           "--weights", str(args.weights), "--batch", str(args.batch), "--img", str(args.img),
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss of children is the largest child so far: only meaningful when it grew
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["process_peak_mib"] = after / 1024 if after > before else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lst", "lora", "full"])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2, help="steps measured (2: AdamW state exists)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = [run_worker(m, args) for m in args.methods]
    full = next((r["train_mib"] for r in results if r["method"] == "full"), None)
    print(f"{args.model}, batch {args.batch}, {args.img} px, {args.device}, "
          f"{args.steps} steps; memory = peak during training - baseline ({results[0]['measure']})")
    print(f"{'method':<12} {'trainable':>10} {'train MiB':>10} {'vs full':>8} {'process peak':>13}")
    for r in results:
        ratio = f"{r['train_mib'] / full:.1%}" if full else "-"
        peak = f"{r['process_peak_mib']:.0f} MiB" if r["process_peak_mib"] else "-"
        print(f"{r['method']:<12} {r['trainable']:>10,} {r['train_mib']:>10.1f} {ratio:>8} "
              f"{peak:>13}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
