"""vpeft's linear probe against a tuned scikit-learn ``LogisticRegression`` on the same features.

    python benchmarks/linear_probe.py --cache /tmp/probe-features            # 224 px protocol
    python benchmarks/linear_probe.py --cache /tmp/probe-features --img-size 112

For each task the frozen DeiT-Tiny's pre-logits features of train800, val200 and test are
extracted once (``vpeft.engine.features``, the code ``vpeft train --method linear`` runs) and
cached under ``--cache``. On them:

* vpeft: :func:`vpeft.engine.probe.fit_probe` on train800val200 (its L2 by 5-fold CV inside it,
  exactly what ``vpeft train --method linear`` does), evaluated on test;
* scikit-learn: ``LogisticRegression`` with C tuned on val200 (trained on train800, C on a log
  grid), then refitted on train800val200 with the best C, evaluated on test.

VTAB-1k's train800val200 list is train800 followed by val200, so its features are those two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import vpeft
from vpeft.data import data_config, eval_transform, open_dataset
from vpeft.engine.features import extract_features
from vpeft.engine.model import build_backbone
from vpeft.engine.probe import fit_probe
from vpeft.engine.runtime import make_accelerator, make_loader

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
C_GRID = [10.0 ** (e / 2) for e in range(-8, 9)]  # 1e-4 .. 1e4


def features(task: Path, img_size: int, cache: Path) -> dict[str, torch.Tensor]:
    """``{split: features, split_y: labels}`` for train800, val200 and test, cached on disk."""
    file = cache / f"{task.name}-{img_size}.pt"
    if file.is_file():
        return torch.load(file)
    train = open_dataset(str(task), "train800")
    model = build_backbone("deit_tiny_patch16_224", train.num_classes, str(WEIGHTS),
                           img_size=img_size)
    vpeft.adapt(model, "linear")
    accelerator = make_accelerator("no", cpu=True)
    out: dict[str, torch.Tensor] = {}
    for split in ("train800", "val200", "test"):
        ds = open_dataset(str(task), split, classes=train.classes)
        ds.transform = eval_transform(data_config(model, img_size))
        loader = accelerator.prepare(make_loader(ds, 64, 0))
        x, y = extract_features(model, loader, accelerator, "pre-logits", False).tensors
        out[split], out[split + "_y"] = x, y
    out["head"] = model.get_submodule("head").state_dict()  # the head vpeft starts from
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, file)
    return out


def sklearn_tuned(f: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(best C on val200, test top-1 %) of LogisticRegression refitted on train800val200."""
    def fit(x: torch.Tensor, y: torch.Tensor, c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000).fit(x.numpy(), y.numpy())

    scores = [fit(f["train800"], f["train800_y"], c).score(f["val200"].numpy(),
                                                           f["val200_y"].numpy()) for c in C_GRID]
    best = C_GRID[int(np.argmax(scores))]
    x = torch.cat([f["train800"], f["val200"]])
    y = torch.cat([f["train800_y"], f["val200_y"]])
    return best, 100.0 * fit(x, y, best).score(f["test"].numpy(), f["test_y"].numpy())


def vpeft_probe(f: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, object], float]:
    """(what the probe chose, test top-1 %) of vpeft's probe fitted on train800val200."""
    head = torch.nn.Linear(f["train800"].shape[1], len(f["head"]["bias"]))
    head.load_state_dict(f["head"])
    net = head  # a CachedHead of pre-logits features is the head alone
    x = torch.cat([f["train800"], f["val200"]])
    y = torch.cat([f["train800_y"], f["val200_y"]])
    result = fit_probe(net, x, y, seed)
    with torch.no_grad():
        top1 = 100.0 * (net(f["test"]).argmax(-1) == f["test_y"]).float().mean().item()
    return result.to_dict(), top1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=SHARED / "data" / "vtab1k")
    p.add_argument("--tasks", nargs="+", default=["cifar10", "fashion_mnist", "mnist"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = []
    for task in args.tasks:
        f = features(args.data_root / task, args.img_size, args.cache)
        chosen, ours = vpeft_probe(f, args.seed)
        c, theirs = sklearn_tuned(f)
        rows.append((task, ours, theirs, chosen, c))
        print(json.dumps({"task": task, "vpeft_top1": ours, "sklearn_top1": theirs,
                          "sklearn_C": c, "vpeft": chosen}), flush=True)
    print(f"\n| task ({args.img_size} px) | vpeft probe | sklearn LR (C on val200) | diff | "
          "vpeft l2 | L-BFGS its | train loss | sklearn C |\n|---|---|---|---|---|---|---|---|")
    for task, ours, theirs, chosen, c in rows:
        print(f"| {task} | {ours:.2f} | {theirs:.2f} | {ours - theirs:+.2f} | {chosen['l2']:.0e} |"
              f" {chosen['iterations']} | {chosen['train_loss']:.3f} | {c:.0e} |")


if __name__ == "__main__":
    main()
