"""Profile PEFT methods on one backbone: parameters, FLOPs, latency, step time, memory.

Latency is reported for the base, adapted and merged model (median of interleaved runs after
warm-up, as ratios to the base); training step time as a ratio to the floor (frozen forward plus
backward to the first block's input tokens) and, beside it, the step's FLOPs over the floor's
(every product autograd runs: the ratio a compute-bound device would show, which no kernel can
beat); peak training memory as CUDA max-allocated on GPU, or the peak resident memory of a fresh
subprocess per method on CPU.

``--preset gpu`` is the GPU benchmark (benchmarks/gpu.sh): every method on ViT-B/16 (random
init), batch 64, bf16 autocast, peak CUDA memory measured in-process; flags given with it
override its values. ``--markdown`` prints the table as Markdown.

Examples:
  vpeft profile --weights deit_tiny.safetensors --method lora --method-args rank=8
  vpeft profile --weights deit_tiny.safetensors --all --threads 2 --out profile.json
  vpeft profile --preset gpu --markdown
  vpeft profile --task segmentation --decoder fpn --method e3va --method full --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpeft.commands._common import (
    add_model_arguments,
    at_least,
    check_weights_file,
    parse_key_values,
)

HELP = "measure params, FLOPs, latency, step time and memory of methods"

#: named sets of defaults; ``gpu``: the benchmark for one GPU (about 5 minutes on one H100-class)
PRESETS: dict[str, dict] = {
    "gpu": {"model": "vit_base_patch16_224", "weights": None, "batch_size": 64, "img_size": 224,
            "precision": "bf16", "all": True, "warmup": 2, "repeats": 5, "device": "cuda"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", action="append", default=[], help="method to profile (repeatable)")
    p.add_argument(
        "--method-args",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="options of the (single) --method, e.g. rank=8",
    )
    p.add_argument("--all", action="store_true", help="every registered method")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed rounds")
    p.add_argument("--repeats", type=at_least(1), default=7,
                   help="timed rounds (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory probes")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="skip training-step timing (latency, FLOPs and counts only)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward passes under bf16 autocast")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="gpu: every method, ViT-B/16 random init, batch 64, bf16 (explicit "
                        "flags override)")
    p.add_argument("--task", choices=("image", "segmentation"), default="image",
                   help="segmentation: the decoder in the head's place, per-pixel loss")
    p.add_argument("--decoder", choices=("linear", "fpn"), default="fpn",
                   help="segmentation decoder")
    p.add_argument("--decoder-width", type=at_least(1), default=128,
                   help="channels of the fpn decoder")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the preset's values wherever a flag was left at its default."""
    if not args.preset:
        return args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    if args.method:  # methods named with the preset replace its "every method"
        args.all = False
    return args


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from vpeft.bench.profile import ProfileSpec, profile
    from vpeft.registry import list_methods

    args = apply_preset(args)
    names = [m.name for m in list_methods()] if args.all else args.method
    if not names:
        raise ValueError("name at least one --method, or --all")
    if args.method_args and len(names) != 1:
        raise ValueError("--method-args applies to a single --method")
    if args.out and args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    check_weights_file(args.weights)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda (the gpu preset's device): no CUDA GPU here; "
                         "pass --device cpu to run it on the CPU")
    options = parse_key_values(args.method_args)
    spec = ProfileSpec(
        model=args.model,
        weights=args.weights,
        batch_size=args.batch_size,
        img_size=args.img_size,
        num_classes=args.num_classes,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        memory=not args.no_memory,
        train=not args.no_train,
        model_args=parse_key_values(args.model_args, "--model-args"),
        precision=args.precision,
        task=args.task,
        task_options=({"decoder": args.decoder, "decoder_width": args.decoder_width}
                      if args.task == "segmentation" else {}),
    )
    err = Console(stderr=True)
    result = profile(spec, [(n, options) for n in names], progress=lambda m: err.log(m),
                     skip_inapplicable=args.all)
    if args.markdown:
        print_markdown(result)
    else:
        print_table(result)
    if args.out:
        write_json(args.out, result)
    return 0


def write_json(path: Path, result: dict) -> None:
    from vpeft.core.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f = result["floor"]
    table = Table(
        title=f"profile on {result['device']} ({result['threads']} threads); floor step "
        f"{_fmt(f['step_ms'], '.1f')} ms, base latency {f['base_latency_ms']:.1f} ms"
    )
    cols = [
        "method",
        "trainable",
        "no head",
        "GFLOPs/img",
        "latency x base",
        "merged x base",
        "step ms",
        "step x floor",
        "FLOPs x floor",
        "train MB",
    ]
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for r in result["methods"]:
        table.add_row(
            r["method"],
            f"{r['trainable_params']:,}",
            f"{r['trainable_params_no_head']:,}",
            _fmt(r["gflops_per_image"], ".3f"),
            _fmt(r["latency_ratio_adapted"], ".3f"),
            _fmt(r["latency_ratio_merged"], ".3f"),
            _fmt(r["step_ms"], ".1f"),
            _fmt(r["step_ratio_floor"], ".3f"),
            _fmt(r.get("train_flops_ratio_floor"), ".3f"),
            _fmt(r.get("train_memory_mb"), ".0f"),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for name, reason in result.get("skipped", {}).items():
        console.print(f"{name}: not applicable ({reason})", markup=False)


def print_markdown(result: dict) -> None:
    """The results as a Markdown table: step time, images/s, peak memory, ratios to the floor."""
    f, spec = result["floor"], result["spec"]
    print(f"{spec['model']}, batch {spec['batch_size']}, {spec['img_size']} px, "
          f"{spec['precision']}, on {result['device']} (torch {result['torch']}); floor step "
          f"{_fmt(f['step_ms'], '.1f')} ms, base latency {f['base_latency_ms']:.1f} ms, floor "
          f"training memory {_fmt(f.get('train_memory_mb'), '.0f')} MB\n")
    cols = ["method", "trainable (no head)", "step ms", "images/s", "step x floor",
            "train FLOPs x floor", "training MB", "peak MB", "latency x base", "merged x base"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in result["methods"]:
        cells = [r["method"], f"{r['trainable_params_no_head']:,}", _fmt(r["step_ms"], ".1f"),
                 _fmt(r.get("images_per_second"), ".1f"), _fmt(r["step_ratio_floor"], ".3f"),
                 _fmt(r.get("train_flops_ratio_floor"), ".3f"),
                 _fmt(r.get("train_memory_mb"), ".0f"), _fmt(r.get("peak_memory_mb"), ".0f"),
                 _fmt(r["latency_ratio_adapted"], ".3f"), _fmt(r["latency_ratio_merged"], ".3f")]
        print("| " + " | ".join(cells) + " |")
    if result.get("skipped"):
        print(f"\nNot applicable to {spec['model']}: {', '.join(result['skipped'])}.")
