"""``vpeft search``: the engine's three stages for NOAH and GLoRA, the plan checked up front."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import vpeft
from datagen import write_list_dataset
from vpeft.cli import main
from vpeft.engine.config import TrainConfig
from vpeft.engine.search import SearchConfig, plan

from conftest import NUM_CLASSES, TINY_DIMS, tiny_model

BUDGET = 2_500
BASE = ["search", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args",
        *[f"{k}={v}" for k, v in TINY_DIMS.items()], "--epochs", "1", "--batch-size", "8",
        "--num-workers", "0", "--search-epochs", "2", "--population", "4", "--select", "2",
        "--mutation", "2", "--crossover", "2"]
NOAH = [*BASE, "--method", "noah", "--budget", str(BUDGET), "--space", "adapter=8",
        "lora=[2,8]", "prompt=10"]


def vpeft_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_list_dataset(tmp_path / "data", {"train800": 16, "val200": 10, "test": 10},
                              classes=NUM_CLASSES)


def check_final_run(run: Path, method: str, budget: int) -> dict:
    """The search record kept to the budget on val200; the final run is an ordinary adapter."""
    found = json.loads((run / "search.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert (found["method"], found["budget"], found["split"]) == (method, budget, "val200")
    assert found["params"] <= budget and len(found["history"]) == 2
    assert found["evaluated"] and all(c["params"] <= budget for c in found["evaluated"])
    assert (results["method"], results["train_split"], results["split"]) == (
        method, "train800val200", "test")
    supernet = json.loads((run / "supernet" / "results.json").read_text())
    assert (supernet["train_split"], supernet["split"]) == ("train800", "val200")
    model = vpeft.load(tiny_model(), run)
    assert vpeft.get_state(model).method.name == method
    assert vpeft.summary(model).trainable_no_head == found["params"]
    assert results["trainable_params_no_head"] == found["params"]
    return found


def test_noah_search_end_to_end_then_resume(tmp_path: Path, data: Path,
                                            capsys: pytest.CaptureFixture,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    command = [*NOAH, "--data", data, "--out", run]
    code, stdout = vpeft_cli(capsys, *command)
    assert code == 0
    found = check_final_run(run, "noah", BUDGET)
    assert found["space"]["lora"] == [2, 8] and found["space"]["adapter"] == [1, 4, 8]
    assert found["space"]["depths"] == [1, 2]  # NOAH's {L/4, L/2, 3L/4, L} on 2 blocks
    config = vpeft.get_state(vpeft.load(tiny_model(), run)).config
    assert [list(config.adapter), list(config.lora), list(config.prompt)] == [
        found["choice"][k] for k in ("adapter", "lora", "prompt")]
    results = json.loads((run / "results.json").read_text())
    assert json.loads(stdout)["top1"] == results["top1"]

    # re-running a finished job does nothing again
    stamps = [run / "search.json", run / "supernet" / "adapter.safetensors",
              run / "results.json"]
    before = mtimes(*stamps)
    caplog.clear()
    assert vpeft_cli(capsys, *command)[0] == 0
    assert mtimes(*stamps) == before
    assert "skipping the supernet and the search" in caplog.text

    # interrupted in stage 2: the finished supernet is kept, the search gives the same choice
    (run / "search.json").unlink()
    caplog.clear()
    assert vpeft_cli(capsys, *command)[0] == 0
    assert mtimes(stamps[1]) == before[1:2]
    assert f"{run / 'supernet'} is complete" in caplog.text
    assert json.loads((run / "search.json").read_text())["choice"] == found["choice"]

    # other search settings on the same folder are refused, not silently mixed
    changed = [*command]
    changed[changed.index("--budget") + 1] = "2000"
    code = main([str(a) for a in changed])
    assert code == 2 and "budget: 2500 != 2000" in capsys.readouterr().err


def test_glora_search_end_to_end(tmp_path: Path, data: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    run, budget = tmp_path / "run", 3_000
    command = [*BASE, "--method", "glora", "--budget", budget, "--space", "rank=[2,4]",
               "--data", data, "--out", run]
    assert vpeft_cli(capsys, *command)[0] == 0
    found = check_final_run(run, "glora", budget)
    assert found["space"]["A"] == ["lora2", "lora4", "vector", "scalar", "none"]
    per_layer = found["choice"]["per_layer"]
    assert len(per_layer) == 8  # qkv, proj, fc1, fc2 in each of the 2 blocks
    config = vpeft.get_state(vpeft.load(tiny_model(), run)).config
    assert list(config.per_layer) == per_layer


def test_a_budget_no_subnet_fits_is_refused_before_training(tmp_path: Path, data: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    # the smallest NOAH subnet of the default space on the tiny ViT (D=48): one block each of
    # an adapter of width 1 (2*48 + 1 + 48), LoRA rank 1 (48 + 144) and one prompt (48)
    smallest = (2 * 48 + 1 + 48) + (48 + 144) + 48
    run = tmp_path / "run"
    command = [*BASE, "--method", "noah", "--budget", smallest - 1, "--data", data, "--out", run]
    code = main([str(a) for a in command])
    err = capsys.readouterr().err
    assert code == 2 and "smallest subnet" in err and f"{smallest} parameters" in err
    assert not (run / "supernet").exists()  # nothing trained
    # the number is reachable: with a space of only that subnet, that budget is searched
    command[command.index("--budget") + 1] = str(smallest)
    space = ["--space", "adapter=[1]", "lora=[1]", "prompt=[1]", "depths=[1]"]
    assert main([str(a) for a in command] + space) == 0
    assert json.loads((run / "search.json").read_text())["params"] == smallest


@pytest.mark.parametrize("method, space, match", [
    ("noah", {"rank": 4}, "unknown noah search space"),
    ("noah", {"adapter": [0, 4]}, ">= 1"),
    ("noah", {"depths": [3]}, "exceed the backbone's 2 blocks"),
    ("glora", {"rank": 0}, "rank expects integers >= 1"),
    ("glora", {"targets": ["nothing"]}, "matched no module of type Linear"),
])
def test_bad_search_spaces_are_refused_by_the_plan(tmp_path: Path, method: str, space: dict,
                                                    match: str) -> None:
    train = TrainConfig(model="vit_tiny_patch16_224", data=str(tmp_path), method=method,
                        out=str(tmp_path / "run"), pretrained=False, model_args=dict(TINY_DIMS))
    with pytest.raises(ValueError, match=match):
        plan(SearchConfig(train=train, budget=10**6, method=method, space=space))


def test_search_config_checks(tmp_path: Path) -> None:
    train = TrainConfig(model="vit_tiny_patch16_224", data=str(tmp_path), method="noah",
                        out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="evaluation split"):
        SearchConfig(train=train, budget=1000, method="noah", val_split="test")
    with pytest.raises(ValueError, match="budget"):
        SearchConfig(train=train, budget=0, method="noah")
    with pytest.raises(ValueError, match="'lora' has no search; searchable: glora, noah"):
        SearchConfig(train=train, budget=1000, method="lora")
    with pytest.raises(ValueError, match="unknown method"):
        SearchConfig(train=train, budget=1000, method="nope")
