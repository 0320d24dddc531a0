"""``vpeft search``: NOAH's supernet, search and retraining end to end, the budget, resuming."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import vpeft
from datagen import write_list_dataset
from vpeft.cli import main
from vpeft.engine.config import TrainConfig
from vpeft.engine.search import SearchConfig, search_space_sizes

from conftest import NUM_CLASSES, TINY_DIMS, tiny_model

BUDGET = 2_500
COMMAND = ["search", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args",
           *[f"{k}={v}" for k, v in TINY_DIMS.items()], "--epochs", "1", "--batch-size", "8",
           "--num-workers", "0", "--budget", str(BUDGET), "--space", "adapter=8", "lora=[2,8]",
           "prompt=10", "--search-epochs", "2", "--population", "4", "--select", "2",
           "--mutation", "2", "--crossover", "2"]


def vpeft_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def test_search_end_to_end_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data = write_list_dataset(tmp_path / "data", {"train800": 16, "val200": 10, "test": 10},
                              classes=NUM_CLASSES)
    run = tmp_path / "run"
    command = [*COMMAND, "--data", data, "--out", run]
    code, stdout = vpeft_cli(capsys, *command)
    assert code == 0
    summary = json.loads(stdout)
    found = json.loads((run / "search.json").read_text())
    results = json.loads((run / "results.json").read_text())

    # stage 2 kept to the budget and scored on val200 only; stage 3 trained train800val200 -> test
    assert found["budget"] == BUDGET and found["split"] == "val200"
    assert found["params"] <= BUDGET and len(found["history"]) == 2
    assert found["evaluated"] and all(c["params"] <= BUDGET for c in found["evaluated"])
    assert found["space"]["lora"] == [2, 8] and found["space"]["adapter"] == [1, 4, 8]
    assert (results["method"], results["train_split"], results["split"]) == (
        "noah", "train800val200", "test")
    assert summary["top1"] == results["top1"] and summary["choice"] == found["choice"]
    supernet = json.loads((run / "supernet" / "results.json").read_text())
    assert (supernet["train_split"], supernet["split"]) == ("train800", "val200")

    # the final adapter is an ordinary one: it loads, has the chosen sizes, fits the budget
    model = vpeft.load(tiny_model(), run)
    config = vpeft.get_state(model).config
    assert [list(config.adapter), list(config.lora), list(config.prompt)] == [
        found["choice"][k] for k in ("adapter", "lora", "prompt")]
    assert vpeft.summary(model).trainable_no_head == found["params"] <= BUDGET
    assert results["trainable_params_no_head"] == found["params"]
    code, stdout = vpeft_cli(capsys, "eval", "--run", run, "--num-workers", "0")
    assert code == 0 and json.loads(stdout)["top1"] == results["top1"]

    # re-running a finished job does nothing again
    stamps = [run / "search.json", run / "supernet" / "adapter.safetensors",
              run / "results.json"]
    before = mtimes(*stamps)
    caplog.clear()
    assert vpeft_cli(capsys, *command)[0] == 0
    assert mtimes(*stamps) == before
    assert "skipping the supernet and the search" in caplog.text

    # interrupted in stage 3: the search is not redone, stage 3 runs again
    (run / "results.json").unlink()
    (run / "adapter.safetensors").unlink()
    caplog.clear()
    assert vpeft_cli(capsys, *command)[0] == 0
    assert mtimes(*stamps[:2]) == before[:2]
    assert "skipping the supernet and the search" in caplog.text
    assert json.loads((run / "results.json").read_text())["top1"] == results["top1"]

    # interrupted in stage 2: the finished supernet is kept, the search gives the same choice
    (run / "search.json").unlink()
    caplog.clear()
    assert vpeft_cli(capsys, *command)[0] == 0
    assert mtimes(stamps[1]) == before[1:2]
    assert f"{run / 'supernet'} is complete" in caplog.text
    assert json.loads((run / "search.json").read_text())["choice"] == found["choice"]

    # other search settings on the same folder are refused, not silently mixed
    changed = [*command]
    changed[changed.index("--budget") + 1] = "1000"
    code = main([str(a) for a in changed])
    assert code == 2 and "budget: 2500 != 1000" in capsys.readouterr().err


def test_search_space_and_config_checks(tmp_path: Path) -> None:
    assert search_space_sizes({}) == {"adapter": (1, 4, 8), "lora": (1, 4, 8),
                                      "prompt": (1, 5, 10)}
    assert search_space_sizes({"lora": [4, 2], "depths": 1}) == {
        "adapter": (1, 4, 8), "lora": (2, 4), "prompt": (1, 5, 10), "depths": (1,)}
    with pytest.raises(ValueError, match="unknown search space"):
        search_space_sizes({"rank": 4})
    with pytest.raises(ValueError, match=">= 1"):
        search_space_sizes({"adapter": [0, 4]})
    train = TrainConfig(model="vit_tiny_patch16_224", data=str(tmp_path), method="noah",
                        out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="evaluation split"):
        SearchConfig(train=train, budget=1000, val_split="test")
    with pytest.raises(ValueError, match="budget"):
        SearchConfig(train=train, budget=0)
