"""Malformed input through the command line: each case must exit with code 2 and one clear error
line on stderr (no traceback), and leave every existing run, checkpoint, data set and result file
byte-for-byte as it was.

Cases cover configs, list files, images, data folders, weights files, numbers, run folders,
adapter checkpoints, bench suites and report inputs. Masks are not covered: vpeft has no
segmentation task yet.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import save_file

from datagen import write_list_dataset
from vpeft.cli import main

from conftest import TINY_DIMS

MODEL_ARGS = [f"{k}={v}" for k, v in TINY_DIMS.items()]
TINY = ["--model", "vit_tiny_patch16_224", "--model-args", *MODEL_ARGS]
FAST = ["--epochs", "1", "--batch-size", "8", "--num-workers", "0"]


@dataclass
class World:
    """What a case may use: a finished run, its data set, and a scratch folder."""

    run: Path
    data: Path
    tmp: Path

    def data_copy(self, edit: Callable[[Path], None]) -> Path:
        """A copy of the data set with ``edit`` applied to it."""
        root = self.tmp / "bad-data"
        shutil.copytree(self.data, root)
        edit(root)
        return root

    def run_copy(self, edit: Callable[[Path], None]) -> Path:
        """A copy of the finished run with ``edit`` applied to it (a damaged checkpoint)."""
        root = self.tmp / "bad-run"
        shutil.copytree(self.run, root)
        edit(root)
        return root

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def train(self, *args: object) -> list[object]:
        return ["train", *TINY, "--no-pretrained", *FAST, "--out", self.tmp / "new-run",
                "--method", "linear", *args]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("fuzz")
    data = write_list_dataset(root / "data", {"train800": 16, "val200": 8, "test": 8}, classes=3)
    run = root / "run"
    assert main(["train", *TINY, "--no-pretrained", *FAST, "--data", str(data), "--method",
                 "lora", "--out", str(run)]) == 0
    return World(run=run, data=data, tmp=root)


def _edit_list(line: int, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "train800val200.txt"
        lines = path.read_text().splitlines()
        lines[line] = text
        path.write_text("\n".join(lines) + "\n")
    return edit


def _write(rel: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def _edit_json(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        meta = json.loads((root / rel).read_text())
        change(meta)
        (root / rel).write_text(json.dumps(meta))
    return edit


def _truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: int(len(data) * keep)])
    return edit


def _weights(w: World, cut: bool) -> Path:
    """A small real safetensors file, whole or cut in the middle of its tensors."""
    import torch

    path = w.tmp / ("cut.safetensors" if cut else "whole.safetensors")
    save_file({"a": torch.zeros(64, 64)}, str(path))
    if cut:
        path.write_bytes(path.read_bytes()[:-1000])
    return path


# (case id, argv from the world, a piece of the expected error line)
CASES: list[tuple[str, Callable[[World], list[object]], str]] = [
    # -- configs
    ("yaml-not-mapping", lambda w: ["train", "--config", w.file("a.yaml", "- 1\n- 2\n")],
     "mapping"),
    ("yaml-syntax", lambda w: ["train", "--config", w.file("b.yaml", "epochs: [1\n")],
     "not valid YAML"),
    ("yaml-unknown-key", lambda w: ["train", "--config", w.file("c.yaml", "epoch: 3\n")],
     "unknown option 'epoch'"),
    ("yaml-wrong-type", lambda w: w.train("--data", w.data, "--config",
                                          w.file("d.yaml", "lr: many\n")), "lr"),
    ("yaml-missing", lambda w: ["train", "--config", w.tmp / "nope.yaml"], "does not exist"),
    ("run-config-needs-out", lambda w: ["train", "--config", w.run / "config.yaml"],
     "missing required option(s): --out"),
    ("flag-not-int", lambda w: w.train("--data", w.data, "--epochs", "abc"), "invalid int"),
    ("flag-negative-lr", lambda w: w.train("--data", w.data, "--lr", "-1"), "lr must be > 0"),
    ("method-args-no-value", lambda w: w.train("--data", w.data, "--method-args", "rank"),
     "KEY=VALUE"),
    ("unknown-method", lambda w: [*w.train("--data", w.data), "--method", "lorra"],
     "unknown method"),
    ("unknown-method-option", lambda w: [*w.train("--data", w.data), "--method", "lora",
                                         "--method-args", "rnk=4"], "rnk"),
    ("eval-batch-size-0", lambda w: w.train("--data", w.data, "--eval-batch-size", "0"),
     "eval_batch_size must be >= 1"),
    ("num-workers-negative", lambda w: w.train("--data", w.data, "--num-workers", "-1"),
     "num_workers"),
    # -- list files
    ("split-missing", lambda w: w.train("--data", w.data, "--train-split", "train9"),
     "no split 'train9'"),
    ("label-not-int", lambda w: w.train("--data", w.data_copy(
        _edit_list(2, "images/train800/000002.png cat"))), "train800val200.txt:3"),
    ("label-negative", lambda w: w.train("--data", w.data_copy(
        _edit_list(0, "images/train800/000000.png -1"))), "label -1 is out of range"),
    ("label-too-large", lambda w: w.train("--data", w.data_copy(
        _edit_list(1, "images/train800/000001.png 3"))), "label 3 is out of range"),
    ("list-empty", lambda w: w.train("--data", w.data_copy(_write("train800val200.txt", ""))),
     "holds no images"),
    ("list-image-missing", lambda w: w.train("--data", w.data_copy(
        _edit_list(0, "images/train800/nope.png 0"))), "nope.png not found"),
    # -- images
    ("image-corrupt", lambda w: w.train("--data", w.data_copy(
        _write("images/train800/000000.png", b"\x89PNG not really"))), "000000.png"),
    ("image-empty", lambda w: w.train("--data", w.data_copy(
        _write("images/train800/000001.png", b""))), "000001.png"),
    ("image-corrupt-in-worker", lambda w: [*w.train("--data", w.data_copy(
        _write("images/train800/000005.png", b"GIF89a\x00"))), "--num-workers", "1",
        "--no-cache-features"], "000005.png"),
    # -- data folders
    ("data-is-a-file", lambda w: w.train("--data", w.data / "classes.txt"),
     "is a file, expected a folder"),
    ("data-missing", lambda w: w.train("--data", w.tmp / "no-data"), "does not exist"),
    # -- weights and sizes
    ("weights-not-safetensors", lambda w: [*w.train("--data", w.data, "--weights",
                                           w.file("junk.safetensors", b"junk" * 10)),
                                           "--pretrained"], "junk.safetensors"),
    ("weights-truncated", lambda w: [*w.train("--data", w.data, "--weights", _weights(w, True)),
                                     "--pretrained"], "cut.safetensors"),
    ("weights-torch-truncated", lambda w: [*w.train("--data", w.data, "--weights",
                                           w.file("junk.pth", b"PK\x03\x04 cut")),
                                           "--pretrained"], "junk.pth"),
    ("weights-folder", lambda w: [*w.train("--data", w.data, "--weights", w.tmp),
                                  "--pretrained"], "is a folder"),
    ("img-size-below-patch", lambda w: ["train", "--model", "vit_tiny_patch16_224",
                                        "--model-args", *MODEL_ARGS[1:], "--img-size", "4",
                                        "--no-pretrained", *FAST, "--data", w.data, "--method",
                                        "linear", "--out", w.tmp / "new-run"],
     "smaller than one 8x8-pixel patch"),
    ("out-read-only", lambda w: [*w.train("--data", w.data), "--out", "/sys/vpeft-fuzz"],
     "/sys/vpeft-fuzz"),
    # -- run folders
    ("out-holds-run", lambda w: [*w.train("--data", w.data), "--out", w.run],
     "already holds a run"),
    ("resume-finished-new-settings", lambda w: ["train", "--resume", "--out", w.run, "--epochs",
                                                "7"], "epochs: 7 != 1"),
    ("out-is-a-file", lambda w: [*w.train("--data", w.data), "--out", w.run / "results.json"],
     "not a folder"),
    # -- eval and checkpoints
    ("eval-batch-size-0", lambda w: ["eval", "--run", w.run, "--batch-size", "0"], "must be >= 1"),
    ("eval-not-a-run", lambda w: ["eval", "--run", w.tmp], "not a vpeft run folder"),
    ("eval-weights-truncated", lambda w: ["eval", "--run", w.run, "--weights", _weights(w, True)],
     "cut.safetensors"),
    ("adapter-truncated", lambda w: ["eval", "--run", w.run_copy(
        _truncate("adapter.safetensors"))], "adapter.safetensors"),
    ("adapter-config-not-json", lambda w: ["eval", "--run", w.run_copy(
        _write("adapter_config.json", "{\"method\": "))], "adapter_config.json"),
    ("adapter-config-no-method", lambda w: ["eval", "--run", w.run_copy(
        _edit_json("adapter_config.json", lambda m: m.pop("method")))], "adapter_config.json"),
    ("adapter-config-not-mapping", lambda w: ["eval", "--run", w.run_copy(
        _edit_json("adapter_config.json", lambda m: m.update(config=[1, 2])))],
     "adapter_config.json"),
    ("adapter-wrong-base", lambda w: ["eval", "--run", w.run_copy(
        _edit_json("adapter_config.json", lambda m: m["base"].update(architecture="resnet50")))],
     "resnet50"),
    # -- profile, bench, report
    ("profile-batch-size-0", lambda w: ["profile", "--batch-size", "0", "--method", "lora"],
     "must be >= 1"),
    ("profile-repeats-0", lambda w: ["profile", "--repeats", "0", "--method", "lora"],
     "must be >= 1"),
    ("bench-unknown-method", lambda w: ["bench", "--suite", w.file(
        "s1.yaml", "methods: [linear, lorra]\nepochs: 1\n"), "--data-root", w.data.parent,
        "--out", w.tmp / "bench"], "lorra"),
    ("bench-bad-option", lambda w: ["bench", "--suite", w.file(
        "s2.yaml", "methods: [linear, {name: lora, args: {rnk: 4}}]\n"), "--data-root",
        w.data.parent, "--out", w.tmp / "bench"], "rnk"),
    ("bench-bad-grid", lambda w: ["bench", "--suite", w.file(
        "s3.yaml", "methods: [linear, {name: lora, grid: {rank: [4, -1]}}]\n"), "--data-root",
        w.data.parent, "--out", w.tmp / "bench"], "lora"),
    ("report-cut-results", lambda w: ["report", w.run_copy(_truncate("results.json")), "--out",
                                      w.tmp / "report"], "results.json"),
    ("report-missing-folder", lambda w: ["report", w.tmp / "no-results", "--out",
                                         w.tmp / "report"], "no-results"),
]


def _hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file below ``roots`` (and the file names: a new or lost file shows)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_line(world: World, case, capsys: pytest.CaptureFixture
                                           ) -> None:
    name, make_argv, expected = case
    for leftover in ("bad-data", "bad-run", "new-run", "bench", "report"):
        shutil.rmtree(world.tmp / leftover, ignore_errors=True)
    argv = [str(a) for a in make_argv(world)]
    watched = [world.run, world.data, *(world.tmp / d for d in ("bad-data", "bad-run")
                                        if (world.tmp / d).exists())]
    before = _hashes(*watched)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, (name, err)
    assert "Traceback" not in err and len(errors) == 1, (name, err)
    assert expected in errors[0], (name, errors[0])
    assert _hashes(*watched) == before, f"{name} changed an existing file"
    assert not (world.tmp / "bench").exists(), "a bench plan ran before it was validated"


def test_safetensors_framing_check_accepts_a_whole_file(world: World) -> None:
    """The weights check refuses only what is broken: a whole file passes, one byte less fails."""
    from vpeft.commands._common import check_weights_file

    whole = _weights(world, cut=False)
    check_weights_file(whole)
    data = whole.read_bytes()
    (world.tmp / "short.safetensors").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"short\.safetensors"):
        check_weights_file(world.tmp / "short.safetensors")
    (world.tmp / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="header claims"):
        check_weights_file(world.tmp / "huge.safetensors")
