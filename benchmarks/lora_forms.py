"""Where does ``lora`` (q and v) lose to ``hf-lora`` (one pair on fused qkv)? Forms x tasks x seeds.

    python benchmarks/lora_forms.py --out /tmp/lora-forms            # run what is missing
    python benchmarks/lora_forms.py --out /tmp/lora-forms --table    # the markdown table only

Every run is ``vpeft.engine.train`` with the ``quick`` suite's schedule (112 px, 3 epochs, batch
32, AdamW lr 1e-3, train800val200 -> test) on the real DeiT-Tiny, so the only thing that changes
between the rows of one task and seed is the LoRA form. Results are appended to
``<out>/results.jsonl`` as each run ends; a second call skips the runs already there, so the
sweep can be stopped and continued on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from vpeft.engine import train
from vpeft.engine.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"

# label -> (method, method options). Same trainable count as hf-lora unless the label says.
FORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "qv (paper)": ("lora", {"qkv": "qv"}),
    "fused qkv, shared A": ("lora", {"qkv": "fused"}),
    "hf-lora": ("hf:lora", {"target_modules": ("qkv",)}),
    "q,k,v r=8 (1.5x params)": ("lora", {"qkv": "qkv"}),
    "qv alpha=2r": ("lora", {"qkv": "qv", "alpha": 16.0}),
    "fused alpha=2r": ("lora", {"qkv": "fused", "alpha": 16.0}),
}


def run_one(out: Path, task: str, form: str, seed: int, data_root: Path) -> dict[str, Any]:
    method, args = FORMS[form]
    slug = form.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    config = TrainConfig(
        model="deit_tiny_patch16_224", data=str(data_root / task), method=method,
        out=str(out / "runs" / f"{task}-{slug}-s{seed}"), method_args=dict(args),
        weights=str(WEIGHTS), img_size=112, epochs=3, batch_size=32, lr=1e-3, seed=seed,
        num_workers=0, progress=False, overwrite=True)
    r = train(config)
    return {"task": task, "form": form, "seed": seed, "top1": r["top1"],
            "trainable_no_head": r["trainable_params_no_head"],
            "final_loss": json.loads((Path(config.out) / "metrics.jsonl").read_text()
                                     .splitlines()[-1])["loss"]}


def table(rows: list[dict[str, Any]], tasks: list[str], seeds: list[int]) -> str:
    """Markdown: one row per form, per-task per-seed top-1, the per-task mean, the overall mean."""
    got = {(r["task"], r["form"], r["seed"]): r for r in rows}
    head = [f"{t} s{s}" for t in tasks for s in seeds] + [f"{t} mean" for t in tasks]
    lines = ["| form | params (no head) | " + " | ".join(head) + " | mean |",
             "|---" * (len(head) + 3) + "|"]
    for form in FORMS:
        cells, means, params = [], [], "-"
        for t in tasks:
            vals = [got[(t, form, s)]["top1"] for s in seeds if (t, form, s) in got]
            cells += [f"{got[(t, form, s)]['top1']:.1f}" if (t, form, s) in got else "-"
                      for s in seeds]
            means.append(statistics.mean(vals) if vals else None)
            params = next((str(got[(t, form, s)]["trainable_no_head"]) for s in seeds
                           if (t, form, s) in got), params)
        if all(m is None for m in means):
            continue
        cells += [f"{m:.2f}" if m is not None else "-" for m in means]
        overall = statistics.mean(m for m in means if m is not None)
        lines.append(f"| {form} | {params} | " + " | ".join(cells) + f" | {overall:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=SHARED / "data" / "vtab1k")
    p.add_argument("--tasks", nargs="+", default=["cifar10", "fashion_mnist", "mnist"])
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the table of what is there")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if not args.table:
        done = {(r["task"], r["form"], r["seed"]) for r in rows}
        for seed in args.seeds:  # seed-major: a stopped sweep still has whole seeds
            for task in args.tasks:
                for form in args.forms:
                    if (task, form, seed) in done:
                        continue
                    row = run_one(args.out, task, form, seed, args.data_root)
                    rows.append(row)
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print(table(rows, args.tasks, args.seeds))


if __name__ == "__main__":
    main()
