"""The training engine: run folder, resume, feature cache, optimizer groups, several processes,
and a real DeiT-Tiny linear probe on CIFAR-10."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vpeft
from datagen import write_list_dataset
from vpeft.engine import TrainConfig, evaluate_run, train
from vpeft.engine.model import build_backbone
from vpeft.engine.optim import no_decay_names, warmup_cosine
from vpeft.engine.runtime import make_accelerator, progress

from conftest import DATA, TINY, TINY_DIMS, WEIGHTS

train_module = importlib.import_module("vpeft.engine.train")  # `vpeft.engine.train` is the function
METHODS = ["full", "linear", "bitfit", "lora", "ssf", "adapter", "adaptformer", "vpt-shallow",
           "vpt-deep"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 60 training images with batch 8: the last partial batch is dropped; 21 test images
    return write_list_dataset(tmp_path_factory.mktemp("data"),
                              {"train800": 45, "val200": 15, "test": 21}, classes=4)


def tiny_config(data: Path, out: Path, kind: str = "vit", **changes) -> TrainConfig:
    arch, extra = TINY[kind]
    values = dict(model=arch, model_args={**TINY_DIMS, **extra}, pretrained=False, data=str(data),
                  method="lora", out=str(out), epochs=2, batch_size=8, num_workers=0,
                  progress=False)
    return TrainConfig(**{**values, **changes})


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


# -- the run folder -------------------------------------------------------------------------------
def test_train_writes_a_complete_run_folder(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train(tiny_config(data, out, method_args={"rank": 4}))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter.safetensors", "adapter_config.json", "classes.txt", "config.yaml",
        "metrics.jsonl", "results.json"]  # README.md: the model card
    assert json.loads((out / "results.json").read_text()) == results
    for key in ("method", "model", "data", "split", "top1", "trainable_params",
                "trainable_params_no_head", "total_params", "train_seconds", "images_per_second",
                "peak_memory_mb", "seed"):
        assert key in results, key
    assert (results["split"], results["train_split"], results["eval_images"]) == (
        "test", "train800val200", 21)
    assert results["trainable_params_no_head"] == results["trainable_params"] - (48 * 4 + 4)
    assert results["steps"] == 2 * (60 // 8)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(r["images"] == 56 and r["lr"] > 0 and r["seconds"] >= 0 and 0 <= r["train_top1"]
               <= 100 and r["loss"] > 0 for r in history)
    saved = TrainConfig.from_yaml(out / "config.yaml")  # the resolved config loads back
    assert (saved.method_args["rank"], saved.method_args["qkv"], saved.img_size) == (4, "fused", 32)
    assert (out / "classes.txt").read_text().split() == [f"class_{c}" for c in range(4)]
    # the saved adapter reproduces the reported accuracy, through vpeft.load
    again = evaluate_run(out, num_workers=0, show_progress=False)
    assert (again["top1"], again["images"]) == (results["top1"], 21)
    model = timm.create_model(TINY["vit"][0], num_classes=4, **TINY_DIMS)
    vpeft.load(model, out)
    torch.testing.assert_close(model.state_dict()["head.weight"], adapter(out)["head.weight"])


def test_an_existing_run_is_never_replaced_silently(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(data, out, epochs=1))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--overwrite.*--resume"):
        train(tiny_config(data, out, epochs=1))
    train(tiny_config(data, out, epochs=1, lr=5e-3, overwrite=True))
    assert TrainConfig.from_yaml(out / "config.yaml").lr == 5e-3
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    before = (out / "results.json").read_text()
    # a complete run returns its saved results and is left alone
    assert train(tiny_config(data, out, epochs=1, lr=5e-3, resume=True)) == json.loads(before)
    assert (out / "results.json").read_text() == before
    with pytest.raises(ValueError, match="batch_size: 4 != 8"):
        shutil.copy(out / "results.json", tmp_path / "r.json")
        (out / "results.json").unlink()
        train(tiny_config(data, out, epochs=1, lr=5e-3, batch_size=4, resume=True))


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,changes", [
    ("lora", {"method_args": {"dropout": 0.2}, "hflip": True}),  # dropout + flips use RNG
    ("vpt-deep", {}),
    ("linear", {"head_solver": "sgd"}),  # the cached-feature path, by epochs
    ("bitfit", {"head_init": "probe"}),  # LP-FT: the probe stage runs once, before epoch 1
])
def test_resume_ends_where_an_uninterrupted_run_ends(data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     method: str, changes: dict) -> None:
    common = {"method": method, "epochs": 3, **changes}
    model_args = {**TINY_DIMS, "drop_path_rate": 0.1}
    whole = tiny_config(data, tmp_path / "whole", model_args=model_args, **common)
    train(whole)
    real_save = train_module.save_training_state

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_training_state", save_then_die)
    cut = tiny_config(data, tmp_path / "cut", model_args=model_args, **common)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    probe_line = changes.get("head_init") == "probe"  # LP-FT logs its probe as epoch 0
    assert len(metrics(tmp_path / "cut")) == 1 + probe_line
    assert (tmp_path / "cut" / "train_state.pt").exists()
    monkeypatch.setattr(train_module, "save_training_state", real_save)
    resumed = train(tiny_config(data, tmp_path / "cut", model_args=model_args, resume=True,
                                **common))
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
    assert resumed["top1"] == json.loads((tmp_path / "whole" / "results.json").read_text())["top1"]
    assert not (tmp_path / "cut" / "train_state.pt").exists()


# -- what trains ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,cache", [("vit", "pre-logits"), ("deit-distilled", "tokens"),
                                        ("vit-avgpool-reg", "pre-logits")])
def test_feature_cache_trains_the_same_head(data: Path, tmp_path: Path, kind: str,
                                            cache: str) -> None:
    """A head trained on cached features equals one trained through the frozen backbone (also
    with DeiT-distilled's two averaged heads, where the whole token output is cached)."""
    cached = train(tiny_config(data, tmp_path / "c", kind, method="linear", lr=1e-2,
                               head_solver="sgd"))
    direct = train(tiny_config(data, tmp_path / "d", kind, method="linear", lr=1e-2,
                               cache_features=False, head_solver="sgd"))
    assert (cached["feature_cache"], direct["feature_cache"]) == (cache, "none")
    a, b = adapter(tmp_path / "c"), adapter(tmp_path / "d")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert cached["top1"] == direct["top1"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(data: Path, tmp_path: Path, method: str) -> None:
    results = train(tiny_config(data, tmp_path / method, method=method, epochs=1, lr=1e-2))
    assert results["eval_images"] == 21 and results["trainable_params"] > 0
    model = timm.create_model(TINY["vit"][0], num_classes=4, **TINY_DIMS)
    vpeft.load(model, tmp_path / method)  # what was trained loads back


def test_weight_decay_groups(data: Path) -> None:
    model = timm.create_model(TINY["vit"][0], num_classes=4, **TINY_DIMS)
    vpeft.adapt(model, "vpt-deep")
    skip = no_decay_names(model, vpeft.get_state(model).method.no_decay)
    assert {"blocks.0.prompt", "blocks.1.prompt", "head.bias"} <= skip and "head.weight" not in skip
    full = timm.create_model(TINY["vit"][0], num_classes=4, **TINY_DIMS)
    vpeft.adapt(full, "full")
    skip = no_decay_names(full)
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= skip
    assert not {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} & skip


def test_progress_bars_only_on_a_terminal() -> None:
    accelerator = make_accelerator("no", cpu=True)
    assert progress(range(3), accelerator, True).disable  # pytest's stderr is not a terminal
    assert progress(range(3), accelerator, False).disable


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and abs(f(55) - 0.5) < 1e-9 and 0 < f(99) < 1e-3
    assert warmup_cosine(10, 0)(0) == 1.0


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_and_another_image_size(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model(TINY["vit"][0], num_classes=7, **TINY_DIMS)
    path = tmp_path / f"w{suffix}"
    sd = source.state_dict()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    dims = {k: v for k, v in TINY_DIMS.items() if k != "img_size"}
    same = build_backbone(TINY["vit"][0], 4, weights=str(path), img_size=32, model_args=dims)
    assert torch.equal(same.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert same.head.out_features == 4
    bigger = build_backbone(TINY["vit"][0], 4, weights=str(path), img_size=48, model_args=dims)
    assert bigger.pos_embed.shape == (1, 1 + 36, 48)  # resampled from 4x4 to 6x6 patches
    assert torch.equal(bigger.cls_token, source.cls_token)


# -- several processes ----------------------------------------------------------------------------
TWO_PROCESS_SCRIPT = """
import json, sys
from accelerate import PartialState
from vpeft.engine import TrainConfig, evaluate_run, train
results = train(TrainConfig(**json.loads(sys.argv[1])))
ev = evaluate_run(sys.argv[2], num_workers=0, show_progress=False, predictions=True, cpu=True)
if PartialState().is_main_process:
    json.dump({"results": results, "eval": ev}, open(sys.argv[3], "w"))
"""


@pytest.mark.slow
def test_two_processes_agree_with_one(data: Path, tmp_path: Path) -> None:
    """``accelerate launch`` with 2 CPU processes (gloo): the same steps over the same samples, the
    same weights up to float summation order, and every test image evaluated exactly once."""
    one = tiny_config(data, tmp_path / "one", cpu=True)
    one_results = train(one)
    one_eval = evaluate_run(tmp_path / "one", num_workers=0, show_progress=False, predictions=True)
    two = tiny_config(data, tmp_path / "two", cpu=True).to_dict()
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29533", str(script), json.dumps(two), str(tmp_path / "one"),
           str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "two.json").read_text())
    res, ev = out["results"], out["eval"]
    assert res["processes"] == 2 and one_results["processes"] == 1
    assert (res["steps"], res["eval_images"]) == (one_results["steps"], 21)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["images"] for r in m1] == [r["images"] for r in m2] == [56, 56]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(m1, m2))
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the 1-process weights evaluated by 2 processes: the same prediction for every image, once
    assert ev["images"] == one_eval["images"] == 21
    assert ev["predictions"] == one_eval["predictions"] and ev["top1"] == one_eval["top1"]


# -- the real thing -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_deit_linear_probe_on_cifar10(tmp_path: Path) -> None:
    """DeiT-Tiny features on 500 CIFAR-10 training images, 112 px: far above chance (10%).

    A subset and a lower resolution keep this near 10 s on 2 CPU cores (one forward pass over
    1000 images); it is a smoke test of the whole pipeline, not a VTAB number.
    """
    task = DATA / "cifar10"
    if not WEIGHTS.is_file() or not task.is_dir():
        pytest.skip(f"needs {WEIGHTS} and {task} (set VPEFT_WEIGHTS / VPEFT_DATA)")
    subset = tmp_path / "cifar10"
    subset.mkdir()
    (subset / "images").symlink_to(task / "images")
    shutil.copy(task / "classes.txt", subset)
    for split in ("train800val200", "test"):
        lines = (task / f"{split}.txt").read_text().splitlines()[:500]
        (subset / f"{split}.txt").write_text("\n".join(lines) + "\n")
    results = train(TrainConfig(
        model="deit_tiny_patch16_224", weights=str(WEIGHTS), data=str(subset), method="linear",
        out=str(tmp_path / "run"), img_size=112, epochs=20, batch_size=32, num_workers=0,
        progress=False))
    assert results["feature_cache"] == "pre-logits" and results["eval_images"] == 500
    assert results["trainable_params"] == 192 * 10 + 10
    assert results["top1"] > 30.0, results  # about 46 at 112 px (about 70 at 224 px)
