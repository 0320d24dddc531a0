"""The benchmark runner: protocol (val200 chooses, test only reports), resume, missing tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen import write_list_dataset
from vpeft.bench.report import write_report
from vpeft.bench.runner import run_suite
from vpeft.bench.suites import MethodEntry, Suite
from vpeft.cli import main as cli

from conftest import TINY_DIMS

SIZES = {"train800": 16, "val200": 8, "test": 8}  # train800val200 = train800 + val200


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    for task in ("cifar", "eurosat"):
        write_list_dataset(root / task, SIZES, classes=4)
    return root


def tiny_suite(**changes) -> Suite:
    values = dict(
        name="tiny",
        tasks=["cifar", "eurosat", "dmlab"],
        model="vit_tiny_patch16_224",
        methods=[MethodEntry("linear"), MethodEntry("lora", {"rank": 2}, {"lr": [1e-2, 1e-3]})],
        epochs=1,
        img_size=32,
        batch_size=8,
        seeds=[0, 1],
        train={
            "pretrained": False,
            "model_args": {k: v for k, v in TINY_DIMS.items() if k != "img_size"},
            "num_workers": 0,
        },
    )
    return Suite(**{**values, **changes})


def test_suite_runs_resumes_and_reports(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    results = run_suite(tiny_suite(), root, out, progress=False)
    assert len(results) == 2 * 2 * 2  # tasks present x methods x seeds
    assert all(r["split"] == "test" and r["train_split"] == "train800val200" for r in results)
    assert json.loads((out / "missing_tasks.json").read_text()) == ["dmlab"]
    choice = json.loads((out / "cifar" / "lora_rank2" / "choice.json").read_text())
    assert len(choice["candidates"]) == 2
    assert choice["val200_top1"] == max(c["val200_top1"] for c in choice["candidates"])
    val_runs = list((out / "cifar" / "lora_rank2" / "val").glob("*/results.json"))
    assert {json.loads(p.read_text())["split"] for p in val_runs} == {"val200"}
    final = json.loads((out / "cifar" / "lora_rank2" / "seed0" / "results.json").read_text())
    assert final["lr"] == choice["setting"]["lr"]

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    run_suite(tiny_suite(), root, out, progress=False)  # finished runs are skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamp

    report = write_report(out, tmp_path / "report")
    text = report.read_text()
    assert "| linear |" in text and "| lora_rank2 |" in text and "(n=2)" in text


def test_cli_bench_with_overrides(root: Path, tmp_path: Path, capsys) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "tasks: [eurosat]\nmodel: vit_tiny_patch16_224\nmethods: [bitfit]\nepochs: 1\n"
        "img_size: 32\nbatch_size: 8\ntrain: {pretrained: false, num_workers: 0, model_args: "
        + json.dumps({k: v for k, v in TINY_DIMS.items() if k != "img_size"})
        + "}\n"
    )
    out = tmp_path / "out"
    assert (
        cli(
            [
                "bench",
                "--suite",
                str(suite),
                "--data-root",
                str(root),
                "--out",
                str(out),
                "--set",
                "seeds=[3]",
            ]
        )
        == 0
    )
    assert (out / "eurosat" / "bitfit" / "seed3" / "results.json").is_file()
    assert "1 runs finished" in capsys.readouterr().out
