"""Run a suite: methods x tasks x seeds, with the VTAB-1k protocol, resumable.

For each task and method: if the method has a hyper-parameter grid, every setting is trained on
``train800`` and scored on ``val200`` (first seed only) and the best is kept; the final models are
trained on ``train800val200`` with that setting, one per seed, and evaluated once on ``test``.
Test accuracy never chooses anything. Every run is an engine run folder started with
``resume=True``, so finished runs are skipped and an interrupted one continues.

Layout: ``OUT/<task>/<method label>/{val/<setting>, seed<k>}/``, ``OUT/<task>/<label>/choice.json``,
``OUT/suite.yaml`` (the resolved suite) and ``OUT/missing_tasks.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from vpeft.bench.suites import MethodEntry, Suite
from vpeft.core.checkpoint import atomic_write_text
from vpeft.engine import TrainConfig, train
from vpeft.engine.rundir import result_score
from vpeft.registry import missing_requirements

log = logging.getLogger(__name__)
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
BENCH_FILE = "bench.json"


def available(entry: MethodEntry) -> bool:
    """Whether the packages the entry's method declares (``Method.requires``) are installed; a
    method that lacks one is skipped with a warning, not failed after the runs before it."""
    missing = missing_requirements(entry.name)
    if missing:
        log.warning("skipping %s: it needs %s (not installed)", entry.name, ", ".join(missing))
    return not missing


def settings(entry: MethodEntry) -> list[dict[str, Any]]:
    """Every combination of the entry's grid (one empty setting without a grid)."""
    keys = sorted(entry.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(entry.grid[k] for k in keys))]


def make_config(
    suite: Suite,
    entry: MethodEntry,
    data: Path,
    out: Path,
    seed: int,
    setting: dict[str, Any],
    weights: str | None,
    val: bool,
    progress: bool,
) -> TrainConfig:
    """The TrainConfig of one run: suite schedule < suite ``train`` extras < grid setting."""
    base: dict[str, Any] = {
        "model": suite.model,
        "epochs": suite.epochs,
        "img_size": suite.img_size,
        "batch_size": suite.batch_size,
        "lr": suite.lr,
        **suite.train,
        **suite.task_train.get(data.name, {}),
    }
    method_args: dict[str, Any] = {}
    for k, v in {**entry.args, **setting}.items():  # schedule keys (lr ...) go to the run
        (base if k in TRAIN_FIELDS else method_args)[k] = v
    return TrainConfig.from_dict(
        {
            **base,
            "data": str(data),
            "method": entry.name,
            "method_args": method_args,
            "out": str(out),
            "weights": weights,
            "pretrained": weights is not None or suite.train.get("pretrained", True),
            "seed": seed,
            "val": val,
            "resume": True,
            "progress": progress,
        }
    )


def _label(setting: dict[str, Any]) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(setting.items())) or "default"


def run_suite(
    suite: Suite, data_root: Path, out: Path, weights: str | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Run every (task, method, seed) of ``suite``; returns the final runs' results."""
    tasks, missing = suite.resolve_tasks(data_root)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.yaml", yaml.safe_dump(suite.to_dict(), sort_keys=False))
    atomic_write_text(out / "missing_tasks.json", json.dumps(missing, indent=2) + "\n")
    if missing:
        log.warning(
            "%d task(s) of suite %s are missing under %s: %s",
            len(missing),
            suite.name,
            data_root,
            ", ".join(missing),
        )
    if not tasks:
        raise FileNotFoundError(f"no task of suite '{suite.name}' found under {data_root}")
    entries = [e for e in suite.methods if available(e)]
    jobs = [(t, e) for t in tasks for e in entries]
    total = sum(len(settings(e)) * (len(e.grid) > 0) + len(suite.seeds) for _, e in jobs)
    bar = tqdm(total=total, desc=f"suite {suite.name}", disable=not progress, unit="run")
    results = []
    for task, entry in jobs:
        where = out / task / entry.label
        setting = choose(suite, entry, data_root / task, where, weights, bar)
        for seed in suite.seeds:
            bar.set_postfix_str(f"{task} {entry.label} seed {seed}")
            cfg = make_config(
                suite,
                entry,
                data_root / task,
                where / f"seed{seed}",
                seed,
                setting,
                weights,
                val=False,
                progress=False,
            )
            r = train(cfg)
            atomic_write_text(
                where / f"seed{seed}" / BENCH_FILE,
                json.dumps(
                    {
                        "suite": suite.name,
                        "task": task,
                        "label": entry.label,
                        "group": suite.groups.get(task, "other"),
                        "setting": setting,
                    },
                    indent=2,
                )
                + "\n",
            )
            results.append(r)
            bar.update()
    bar.close()
    return results


def choose(
    suite: Suite, entry: MethodEntry, data: Path, where: Path, weights: str | None, bar: tqdm
) -> dict[str, Any]:
    """The grid setting with the best val200 top-1 (train800 -> val200, first seed)."""
    if not entry.grid:
        return {}
    choice_file = where / "choice.json"
    if choice_file.is_file():
        bar.update(len(settings(entry)))
        return json.loads(choice_file.read_text())["setting"]
    scores = []
    for setting in settings(entry):
        bar.set_postfix_str(f"{data.name} {entry.label} val {_label(setting)}")
        cfg = make_config(
            suite,
            entry,
            data,
            where / "val" / _label(setting),
            suite.seeds[0],
            setting,
            weights,
            val=True,
            progress=False,
        )
        scores.append((result_score(train(cfg))[1], setting))
        bar.update()
    best = max(scores, key=lambda s: s[0])  # ties: the first setting listed wins
    atomic_write_text(
        choice_file,
        json.dumps(
            {
                "setting": best[1],
                "val200_top1": best[0],
                "candidates": [{"setting": s, "val200_top1": v} for v, s in scores],
            },
            indent=2,
        )
        + "\n",
    )
    return best[1]
