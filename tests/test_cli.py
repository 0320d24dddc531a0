"""``vpeft train`` and ``vpeft eval``: flags, YAML, run folders, errors, every data layout."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from datagen import write_folder_dataset, write_idx_dataset, write_list_dataset
from vpeft.cli import build_parser, main
from vpeft.engine.config import TrainConfig, parse_kv

from conftest import TINY_DIMS

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args",
             *[f"{k}={v}" for k, v in TINY_DIMS.items()]]
FAST = ["--epochs", "2", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_list_dataset(tmp_path_factory.mktemp("data"),
                              {"train800": 24, "val200": 8, "test": 12}, classes=3)


def vpeft(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_is_there_for_a_newcomer(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "train" in top and "eval" in top
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for expected in ("Examples:", "--method-args", "--config", "--resume", "--overwrite", "--val",
                     "accelerate launch", "train800val200", "(default: 100)", "--img-size"):
        assert expected in text, expected
    text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "Examples:" in text and "--split" in text and "--run" in text


def test_train_then_eval(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, stdout, _ = vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", data, "--method",
                            "lora", "--method-args", "rank=4,alpha=8", "--out", out)
    assert code == 0
    summary = json.loads(stdout)
    results = json.loads((out / "results.json").read_text())
    assert summary["top1"] == results["top1"] and summary["method"] == "lora"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_args"]["rank"] == 4 and saved["method_args"]["alpha"] == 8.0
    assert saved["model_args"] == TINY_DIMS and "resume" not in saved
    code, stdout, _ = vpeft(capsys, "eval", "--run", out, "--num-workers", "0")
    assert code == 0
    ev = json.loads(stdout)
    assert (ev["top1"], ev["images"], ev["split"]) == (results["top1"], 12, "test")
    code, stdout, _ = vpeft(capsys, "eval", "--run", out, "--split", "val200", "--predictions",
                            "--output", tmp_path / "val.json")
    ev = json.loads(stdout)
    assert ev["images"] == 8 and len(ev["predictions"]) == 8
    assert json.loads((tmp_path / "val.json").read_text()) == ev


def test_yaml_config_with_flag_overrides(data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "vit_tiny_patch16_224", "pretrained": False, "model_args": TINY_DIMS,
        "data": str(data), "method": "ssf", "epochs": 1, "batch-size": 8, "lr": "1e-3",
        "num_workers": 0, "out": str(tmp_path / "a")}))
    assert vpeft(capsys, "train", "--config", config, "--lr", "0.004", "--val")[0] == 0
    saved = TrainConfig.from_yaml(tmp_path / "a" / "config.yaml")
    assert (saved.method, saved.epochs, saved.lr, saved.batch_size) == ("ssf", 1, 0.004, 8)
    assert (saved.train_split, saved.eval_split) == ("train800", "val200")
    assert json.loads((tmp_path / "a" / "results.json").read_text())["eval_images"] == 8
    # a run's config.yaml reproduces it exactly
    code = vpeft(capsys, "train", "--config", tmp_path / "a" / "config.yaml", "--out",
                 tmp_path / "b")[0]
    assert code == 0
    a = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_only_the_folder(data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    train_module = importlib.import_module("vpeft.engine.train")
    real_save = train_module.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *TINY_ARGS, *FAST, "--data", str(data), "--method", "bitfit",
              "--out", str(out)])
    monkeypatch.setattr(train_module, "save_training_state", real_save)
    code, _, err = vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", data, "--method",
                         "bitfit", "--out", out)  # the same command again, without --resume
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, stdout, _ = vpeft(capsys, "train", "--resume", "--out", out)
    assert code == 0 and json.loads(stdout)["method"] == "bitfit"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    before = (out / "results.json").read_text()
    code, stdout, err = vpeft(capsys, "train", "--resume", "--out", out, "--epochs", "2",
                              "--data", data)  # finished, same settings: its results
    assert code == 0 and json.loads(stdout)["top1"] == json.loads(before)["top1"]
    code, _, err = vpeft(capsys, "train", "--resume", "--out", out, "--epochs", "5",
                         "--method-args", "targets=[qkv]")  # finished, other settings: refused
    assert code == 2 and "finished run with other settings" in err and "epochs: 5 != 2" in err
    assert (out / "results.json").read_text() == before
    (out / "results.json").unlink()
    (out / "train_state.pt").write_bytes(b"")
    code, _, err = vpeft(capsys, "train", "--resume", "--out", out, "--epochs", "5")
    assert code == 2 and "epochs: 5 != 2" in err


@pytest.mark.parametrize("layout", ["folders", "idx"])
def test_other_layouts_train(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str) -> None:
    if layout == "folders":
        root, classes = write_folder_dataset(tmp_path / "d", {"train": 16, "test": 9}), 3
    else:
        root, classes = write_idx_dataset(tmp_path / "d", {"train": 16, "t10k": 9}), 4
    out = tmp_path / "run"
    code, _, err = vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", root, "--method",
                         "linear", "--train-split", "train", "--eval-split", "test", "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["eval_images"] == 9 and results["train_images"] == 16
    assert len((out / "classes.txt").read_text().split()) == classes
    assert json.loads(vpeft(capsys, "eval", "--run", out)[1])["top1"] == results["top1"]


def test_user_errors_are_one_clear_line(data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--method", "lora", "--out", tmp_path / "x"], "missing required option(s): --data"),
        (["--data", tmp_path / "nope", "--method", "lora", "--out", tmp_path / "x"],
         "data folder"),
        (["--data", data, "--method", "lora", "--out", tmp_path / "x", "--eval-split", "tst"],
         "no split 'tst'"),
        (["--data", data, "--method", "lorra", "--out", tmp_path / "x"], "unknown method"),
        (["--data", data, "--method", "lora", "--method-args", "rnk=4", "--out", tmp_path / "x"],
         "unknown option(s) ['rnk']"),
        (["--data", data, "--method", "lora", "--batch-size", "64", "--out", tmp_path / "x"],
         "larger than the 32 training images"),
    ]
    for args, message in cases:
        code, _, err = vpeft(capsys, "train", *TINY_ARGS, "--num-workers", "0", *args)
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    code, _, err = vpeft(capsys, "train", "--config", config)
    assert code == 2 and "unknown option 'learning_rate'" in err
    code, _, err = vpeft(capsys, "eval", "--run", tmp_path / "nothing")
    assert code == 2 and "not a vpeft run folder" in err
    assert not (tmp_path / "x").exists()  # nothing was written by the failed runs


def test_parse_kv() -> None:
    assert parse_kv(["rank=8", "alpha=16.0", "targets=[qkv,fc1],qkv=qv", "flag=true"]) == {
        "rank": 8, "alpha": 16.0, "targets": ["qkv", "fc1"], "qkv": "qv", "flag": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_kv(["rank"])


def test_help_and_parser_do_not_import_torch() -> None:
    """Start-up: `vpeft --help`, `vpeft train --help` and building every flag of train stay
    light (torch and timm take seconds to import)."""
    code = ("import sys, contextlib, io\n"
            "from vpeft.cli import build_parser, main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'],\n"
            "             ['report', '--help'], ['bench', '--help'], ['profile', '--help'],\n"
            "             ['search', '--help'], ['methods', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "build_parser(only='train')\n"
            "import vpeft, vpeft.engine.config\n"
            "print(sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_package_names() -> None:
    """`import vpeft` then `vpeft.engine.train(...)` works, and the functions train / evaluate /
    search win over their same-named modules as they did when imported eagerly."""
    import vpeft
    import vpeft.engine.train  # sets the package attribute `train` (to the function, see above)

    assert callable(vpeft.engine.train) and vpeft.engine.train.__name__ == "train"
    from vpeft.engine import TrainConfig, evaluate, train

    assert train is importlib.import_module("vpeft.engine.train").train
    assert callable(evaluate) and TrainConfig.__name__ == "TrainConfig"
    assert sorted(vpeft.__all__) == sorted(vpeft._EXPORTS)
    assert vpeft.LoRAConfig().rank >= 1


def test_overwrite_keeps_the_old_run_until_the_new_one_finished(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY_ARGS, *FAST, "--data", data, "--out", out]
    assert vpeft(capsys, *args, "--method", "bitfit")[0] == 0
    (out / "notes.txt").write_text("mine")  # a user's file in the run folder
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    evaluate_module = importlib.import_module("vpeft.engine.train")

    def fail(*a, **k):
        raise ValueError("the evaluation failed")

    monkeypatch.setattr(evaluate_module, "evaluate", fail)
    code, _, err = vpeft(capsys, *args, "--method", "ssf", "--overwrite")
    assert code == 2 and "the evaluation failed" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # old run untouched
    monkeypatch.undo()
    assert vpeft(capsys, *args, "--method", "ssf", "--overwrite")[0] == 0
    assert json.loads((out / "results.json").read_text())["method"] == "ssf"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left
    assert "train_state.pt" not in {p.name for p in out.iterdir()}


def test_run_files_respect_the_umask(data: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", data, "--method", "linear",
                     "--out", out)[0] == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_eval_prints_before_a_failing_output_and_warns_on_training_data(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", data, "--method", "linear",
                 "--out", out)[0] == 0
    checkpoint = importlib.import_module("vpeft.core.checkpoint")

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_text", full_disk)
    with caplog.at_level(logging.WARNING):
        code, stdout, err = vpeft(capsys, "eval", "--run", out, "--split", "val200", "--output",
                                  tmp_path / "ev.json")
    assert json.loads(stdout)["images"] == 8  # the result is there although the write failed
    assert code == 2 and f"No space left on device: {tmp_path / 'ev.json'}" in err
    assert any("training data" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vpeft(capsys, "eval", "--run", out, "--split", "test")
    assert not any("training data" in r.message for r in caplog.records)


def test_img_size_that_patches_do_not_tile_warns(data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    dims = [f"{k}={v}" for k, v in TINY_DIMS.items() if k != "img_size"]
    with caplog.at_level(logging.WARNING):
        code = vpeft(capsys, "train", "--model", "vit_tiny_patch16_224", "--no-pretrained",
                     "--model-args", *dims, "--img-size", "36", *FAST, "--data", data,
                     "--method", "linear", "--out", tmp_path / "run")[0]
    assert code == 0
    assert any("not a multiple of vit_tiny_patch16_224's 8-pixel patch" in r.getMessage()
               and "the last 4 pixels" in r.getMessage() for r in caplog.records)


def test_a_runs_config_yaml_starts_a_new_run(data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "a"
    assert vpeft(capsys, "train", *TINY_ARGS, *FAST, "--data", data, "--method", "linear",
                 "--out", out)[0] == 0
    code, _, err = vpeft(capsys, "train", "--config", out / "config.yaml")
    assert code == 2 and "--out" in err and "already holds" not in err
    assert vpeft(capsys, "train", "--config", out / "config.yaml", "--out", tmp_path / "b")[0] == 0
