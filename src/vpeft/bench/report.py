"""Turn a folder of run results into a Markdown report, CSV tables and PNG plots.

Reads every ``results.json`` below the folder (one per method x task x seed) and, if present,
``profile.json`` (from ``vpeft profile``) for step time, memory and the measured characteristics.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from vpeft.bench.suites import TASK_GROUP
from vpeft.core.checkpoint import atomic_write_text
from vpeft.engine.config import TASK_NAMES
from vpeft.engine.rundir import METRIC_NAMES, result_score


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a cut or foreign file raises a ``ValueError`` naming it."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is it cut short? "
                         "delete it or run that job again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def collect(results_dir: Path) -> list[dict[str, Any]]:
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist or is not a folder")
    rows = []
    for path in sorted(results_dir.rglob("results.json")):
        r = read_json(path)
        # hyper-parameter runs (train800 -> val200) are not results
        if r.get("split") == "val200" or r.get("train_split") == "train800":
            continue
        r["metric"], r["score"] = result_score(r)
        if r.get("task") in TASK_NAMES:  # the engine's task kind; "task" here is the data set
            r["application"] = r.pop("task")
        bench = path.parent / "bench.json"  # task, label and group as the bench runner saw them
        if bench.is_file():
            r.update(read_json(bench))
        r.setdefault("task", Path(r.get("data", path.parent.name)).name)
        r.setdefault("label", r.get("method"))
        r.setdefault("group", TASK_GROUP.get(r["task"], "other"))
        rows.append(r)
    if not rows:
        raise FileNotFoundError(f"no results.json below {results_dir}")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: per-task mean/std over seeds, mean over tasks, per-group means."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[str, tuple[int, int]] = {}
    groups: dict[str, str] = {}
    for r in rows:
        by[r["label"]][r["task"]].append(r["score"])
        params[r["label"]] = (r["trainable_params"], r["trainable_params_no_head"])
        groups[r["task"]] = r["group"]
    tasks = sorted(groups, key=lambda t: (groups[t], t))
    metrics = sorted({r["metric"] for r in rows})
    out: dict[str, Any] = {"tasks": tasks, "groups": groups, "methods": {}, "metrics": metrics}
    for label, per_task in by.items():
        stats = {t: (*_mean_std(v), len(v)) for t, v in per_task.items()}
        complete = all(t in stats for t in tasks)
        means = [stats[t][0] for t in tasks if t in stats]
        group_means = {}
        for g in sorted(set(groups.values())):
            vals = [stats[t][0] for t in tasks if groups[t] == g and t in stats]
            if vals:
                group_means[g] = statistics.fmean(vals)
        out["methods"][label] = {
            "tasks": stats,
            "mean_tasks": statistics.fmean(means) if complete else None,
            "mean_groups": statistics.fmean(group_means.values()) if complete else None,
            "groups": group_means,
            "trainable_params": params[label][0],
            "trainable_params_no_head": params[label][1],
        }
    return out


def pareto(points: list[tuple[float, float, str]]) -> set[str]:
    """Labels on the front: no other point has fewer (or equal) params and higher accuracy."""
    front, best = set(), -math.inf
    for _params, acc, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.add(label)
            best = acc
    return front


def markdown(agg: dict[str, Any], profile: dict[str, Any] | None) -> str:
    tasks, groups = agg["tasks"], agg["groups"]
    gnames = sorted(set(groups.values()))
    head = [
        "method",
        *tasks,
        "mean (tasks)",
        "mean (groups)",
        *[f"{g} mean" for g in gnames],
        "trainable M",
        "trainable M (no head)",
    ]
    lines = [
        "# vpeft benchmark report",
        "",
        f"{score_name(agg)} (%) on each task's evaluation split, mean ± std over seeds "
        "(n = seeds). "
        "*mean (tasks)* is the plain mean over tasks; *mean (groups)* the mean of the "
        "per-group means (VTAB-1k convention). Where a suite searches hyper-parameters, "
        "the choice is made on val200 only (see each run's choice.json).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, m in sorted(agg["methods"].items(), key=lambda kv: kv[1]["trainable_params"]):
        cells = [label]
        for t in tasks:
            if t in m["tasks"]:
                mu, sd, n = m["tasks"][t]
                cells.append(f"{mu:.1f} ± {sd:.1f} (n={n})")
            else:
                cells.append("-")
        cells += [
            _f(m["mean_tasks"]),
            _f(m["mean_groups"]),
            *[_f(m["groups"].get(g)) for g in gnames],
            f"{m['trainable_params'] / 1e6:.4f}",
            f"{m['trainable_params_no_head'] / 1e6:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if profile:
        lines += [
            "",
            "## Characteristics, measured",
            "",
            f"From `vpeft profile` on {profile['device']} ({profile['threads']} threads), "
            f"batch {profile['spec']['batch_size']}, {profile['spec']['img_size']} px. "
            "Structure preserved: the deployed (merged where mergeable) model has exactly "
            "the base model's modules. Overhead: deployed latency / base latency.",
            "",
            "| method | added params | structure preserved | inference overhead (x base) |"
            " step time (x floor) | training memory (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in profile["methods"]:
            lat = r["latency_ratio_merged"] or r["latency_ratio_adapted"]
            lines.append(
                f"| {r['method']} | {r['added_params']:,} | "
                f"{'yes' if r.get('structure_preserved') else 'no'} | {lat:.3f} | "
                f"{_f(r['step_ratio_floor'], '.3f')} | {_f(r.get('train_memory_mb'), '.0f')} |"
            )
    lines += [
        "",
        "Plots: `accuracy_vs_params.png`, `heatmap.png`"
        + (", `cost.png`" if profile else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def score_name(agg: dict[str, Any]) -> str:
    """What the scores are: Top-1, mIoU, or both (per task: top-1 of classification tasks,
    mIoU of segmentation ones)."""
    names = [METRIC_NAMES.get(m, m) for m in agg.get("metrics", ["top1"])]
    return names[0] if len(names) == 1 else "Score (" + " or ".join(names) + " by task)"


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_csv(agg: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = agg.get("metrics", ["top1"])
    key = metrics[0] if len(metrics) == 1 else "score"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "method",
                "task",
                "group",
                f"{key}_mean",
                f"{key}_std",
                "seeds",
                "trainable_params",
                "trainable_params_no_head",
            ]
        )
        for label, m in agg["methods"].items():
            for t, (mu, sd, n) in m["tasks"].items():
                w.writerow(
                    [
                        label,
                        t,
                        agg["groups"][t],
                        f"{mu:.4f}",
                        f"{sd:.4f}",
                        n,
                        m["trainable_params"],
                        m["trainable_params_no_head"],
                    ]
                )


def plots(agg: dict[str, Any], profile: dict[str, Any] | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = agg["methods"]
    pts = [  # with the head: a linear probe trains only the head, and a log axis has no 0
        (m["trainable_params"], m["mean_tasks"], k)
        for k, m in methods.items()
        if m["mean_tasks"] is not None
    ]
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, acc, label in pts:
        on = label in front
        ax.scatter(
            p,
            acc,
            s=60 if on else 30,
            marker="*" if on else "o",
            color="tab:red" if on else "tab:blue",
            zorder=3,
        )
        ax.annotate(label, (p, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fp = sorted((p, a) for p, a, lbl in pts if lbl in front)
    if fp:
        ax.plot(*zip(*fp), color="tab:red", lw=1, ls="--", label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, head included (log scale)")
    ax.set_ylabel("mean top-1 over tasks (%)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    made.append(_save(fig, out / "accuracy_vs_params.png"))

    tasks, labels = agg["tasks"], sorted(methods, key=lambda k: methods[k]["trainable_params"])
    grid = [[methods[m]["tasks"].get(t, (math.nan,))[0] for t in tasks] for m in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(tasks), 1.0 + 0.45 * len(labels)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    lo, hi = im.get_clim()
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):  # dark text on the bright end of viridis, white elsewhere
                dark = (v - lo) > 0.6 * (hi - lo)
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if dark else "white",
                )
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    made.append(_save(fig, out / "heatmap.png"))

    if profile:
        rows = profile["methods"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.8 + 0.4 * len(rows)))
        names = [r["method"] for r in rows]
        axes[0].barh(names, [r["step_ratio_floor"] or 0 for r in rows], color="tab:blue")
        axes[0].axvline(1.0, color="k", lw=1, ls="--")
        axes[0].set_xlabel("training step time (x floor)")
        mem = [r.get("train_memory_mb") or 0 for r in rows]
        axes[1].barh(names, mem, color="tab:orange")
        axes[1].set_xlabel("training memory above the loaded model (MB)")
        for a in axes:
            a.invert_yaxis()
        fig.tight_layout()
        made.append(_save(fig, out / "cost.png"))
    return made


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(results_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Aggregate ``results_dir`` and write ``report.md``, ``results.csv`` and plots into ``out``."""
    target = out / "report.md"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    agg = aggregate(collect(results_dir))
    prof_path = results_dir / "profile.json"
    profile = read_json(prof_path) if prof_path.is_file() else None
    write_csv(agg, out / "results.csv")
    plots(agg, profile, out)
    atomic_write_text(target, markdown(agg, profile))
    return target
