"""The report aggregates seeds and tasks correctly and draws its plots."""

from __future__ import annotations

import json

import pytest

from vpeft.bench.report import aggregate, collect, pareto, write_report
from vpeft.bench.suites import Suite, load_suite
from vpeft.cli import main as cli


def fake_results(root, rows):
    for i, r in enumerate(rows):
        d = root / f"run{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))


def row(method, task, seed, top1, params=1000):
    return {
        "method": method,
        "label": method,
        "task": task,
        "seed": seed,
        "top1": top1,
        "trainable_params": params + 10,
        "trainable_params_no_head": params,
        "data": f"/x/{task}",
    }


@pytest.fixture
def results(tmp_path):
    fake_results(
        tmp_path / "res",
        [
            row("lora", "cifar", 0, 80.0),
            row("lora", "cifar", 1, 82.0),
            row("lora", "eurosat", 0, 90.0),
            row("lora", "dmlab", 0, 40.0),
            row("linear", "cifar", 0, 60.0, params=0),
            row("linear", "eurosat", 0, 70.0, params=0),
            row("linear", "dmlab", 0, 30.0, params=0),
        ],
    )
    return tmp_path / "res"


def test_aggregate_means_over_seeds_tasks_and_groups(results):
    agg = aggregate(collect(results))
    lora = agg["methods"]["lora"]
    assert lora["tasks"]["cifar"][:2] == (81.0, pytest.approx(1.41421356, rel=1e-6))
    assert lora["mean_tasks"] == pytest.approx((81 + 90 + 40) / 3)
    # natural: cifar, specialized: eurosat, structured: dmlab -> group mean equals task mean here
    assert lora["groups"] == {"natural": 81.0, "specialized": 90.0, "structured": 40.0}
    assert lora["mean_groups"] == pytest.approx((81 + 90 + 40) / 3)


def test_group_mean_differs_from_task_mean_when_groups_are_unequal(tmp_path):
    fake_results(
        tmp_path,
        [row("m", "cifar", 0, 100.0), row("m", "dtd", 0, 100.0), row("m", "eurosat", 0, 40.0)],
    )
    m = aggregate(collect(tmp_path))["methods"]["m"]
    assert m["mean_tasks"] == pytest.approx(80.0)
    assert m["mean_groups"] == pytest.approx(70.0)


def test_pareto_front():
    pts = [(1, 50, "a"), (10, 60, "b"), (100, 55, "c"), (1000, 70, "d")]
    assert pareto(pts) == {"a", "b", "d"}


def test_report_files_and_refusal_to_overwrite(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["report", str(results), "--out", str(out)]) == 0
    for name in ("report.md", "results.csv", "accuracy_vs_params.png", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "| lora |" in text and "81.0 ± 1.4 (n=2)" in text
    with pytest.raises(FileExistsError):
        write_report(results, out)


def test_suites_builtin_and_yaml(tmp_path):
    vtab = load_suite("vtab1k")
    assert len(vtab.tasks) == 19 and vtab.groups["kitti"] == "structured"
    present, missing = vtab.resolve_tasks(tmp_path)
    assert present == [] and len(missing) == 19
    (tmp_path / "s.yaml").write_text(
        "tasks: [a]\nmethods: [lora, {name: bitfit, args: {norms: false}}]\nepochs: 2\n"
    )
    s = load_suite(str(tmp_path / "s.yaml"))
    assert isinstance(s, Suite) and s.name == "s" and s.methods[1].args == {"norms": False}
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("nope")
