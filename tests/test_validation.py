"""Validate first, change after: failed calls leave the model as it was, bad input gives a clear
error naming the problem, and one strict set of rules reads every option (issue 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import vpeft
from datagen import write_list_dataset
from vpeft.core.config import coerce
from vpeft.engine import TrainConfig, evaluate_run, train
from vpeft.engine.config import coerce as train_coerce
from vpeft.engine.model import build_backbone
from vpeft.engine.runtime import resolve_precision

from conftest import TINY, TINY_DIMS, tiny_model


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything a failed call could change: module types, trainable flags, hooks, the state."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "tensors": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "state": vpeft.get_state(model, required=False),
        "training": model.training,
    }


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


# -- item 1: a failed adapt / load leaves the model unchanged -------------------------------------
@pytest.mark.parametrize("method, options, error", [
    ("lora", {"rank": 0}, ValueError),  # bad option value
    ("lora", {"rnk": 4}, TypeError),  # unknown option
    ("lora", {"targets": ("fc9",)}, vpeft.TargetNotFoundError),  # raised inside apply
])
def test_failed_adapt_leaves_the_model_as_it_was(method, options, error):
    model = tiny_model().train()
    before, out = fingerprint(model), output(model)
    with pytest.raises(error):
        vpeft.adapt(model, method, **options)
    assert fingerprint(model) == before
    assert torch.equal(output(model), out)


def test_adapt_on_a_backbone_without_the_part_leaves_it_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    before = fingerprint(model)
    with pytest.raises(vpeft.MissingPartError):
        vpeft.adapt(model, "vpt-deep")
    assert fingerprint(model) == before


@pytest.mark.parametrize("method", ["lora", "adapter", "visual-prompt", "vpt-deep", "ssf"])
def test_apply_that_fails_half_way_is_undone(method, monkeypatch):
    """The method changes the model (wraps modules, adds hooks and parameters), then fails."""
    impl = vpeft.get_method(method)
    real_apply = impl.apply

    def apply_then_fail(self, model, view):
        real_apply(self, model, view)
        raise RuntimeError("failed after changing the model")

    model = tiny_model()
    before, out = fingerprint(model), output(model)
    monkeypatch.setattr(impl, "apply", apply_then_fail)
    with pytest.raises(RuntimeError, match="failed after"):
        vpeft.adapt(model, method)
    assert fingerprint(model) == before
    assert torch.equal(output(model), out)
    monkeypatch.undo()
    again = vpeft.adapt(model, method)  # the restored model adapts as a fresh one does
    fresh = vpeft.adapt(tiny_model(), method)
    assert vpeft.summary(again).trainable == vpeft.summary(fresh).trainable


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    vpeft.save(vpeft.adapt(tiny_model(seed=1), "lora", rank=4), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _truncate(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _reshape_one(folder: Path) -> None:
    tensors = load_file(str(folder / "adapter.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(folder / "adapter.safetensors"))


def _add_one(folder: Path) -> None:
    tensors = load_file(str(folder / "adapter.safetensors"))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(folder / "adapter.safetensors"))


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"cannot read .*adapter\.safetensors"),
    (_reshape_one, "has shape"),
    (_add_one, "unexpected"),
    (lambda folder: (folder / "adapter.safetensors").unlink(), r"adapter\.safetensors"),
])
def test_failed_load_leaves_the_model_as_it_was(saved, damage, message):
    damage(saved)
    model = tiny_model()
    before, out = fingerprint(model), output(model)
    with pytest.raises(vpeft.CheckpointError, match=message):
        vpeft.load(model, saved)
    assert fingerprint(model) == before
    assert torch.equal(output(model), out)


def test_failed_load_into_an_adapted_model_changes_no_weight(saved):
    _reshape_one(saved)
    model = vpeft.adapt(tiny_model(), "lora", rank=4)
    weights = {k: v.clone() for k, v in vpeft.adapter_state_dict(model).items()}
    with pytest.raises(vpeft.CheckpointError, match="has shape"):
        vpeft.load(model, saved)
    assert all(torch.equal(v, weights[k]) for k, v in vpeft.adapter_state_dict(model).items())


# -- item 2: a broken adapter config is a CheckpointError naming the file -------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.pop("method"), "'method' must be"),
    (lambda meta: meta.pop("base"), "'base' must be"),
    (lambda meta: meta.update(config=[1, 2]), "'config' must be a mapping"),
    (lambda meta: meta["base"].pop("shape_hash"), "'base' lacks 'shape_hash'"),
    (lambda meta: meta.update(method="lorra"), "unknown method 'lorra'"),
    (lambda meta: meta["config"].update(rank="eight"), "rank"),
    (lambda meta: meta["config"].update(rnk=4), "unknown option"),
])
def test_broken_adapter_config_names_the_file(saved, edit, message):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    model = tiny_model()
    with pytest.raises(vpeft.CheckpointError, match=message) as info:
        vpeft.load(model, saved)
    assert str(path) in str(info.value)
    assert vpeft.get_state(model, required=False) is None
    with pytest.raises(vpeft.CheckpointError, match=message):
        vpeft.MultiTaskModel(tiny_model()).load("task", saved)


@pytest.mark.parametrize("text", ["[1, 2]", "{broken", "\xff\xfe"])
def test_adapter_config_that_is_not_a_json_object(saved, text):
    (saved / "adapter_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(vpeft.CheckpointError, match=r"adapter_config\.json"):
        vpeft.read_config(saved)


# -- item 3: a model that is not a module ---------------------------------------------------------
@pytest.mark.parametrize("call", [lambda m: vpeft.adapt(m, "lora"),
                                  lambda m: vpeft.load(m, "nowhere")])
def test_a_non_module_model_is_a_type_error(call):
    with pytest.raises(TypeError, match=r"torch\.nn\.Module.*got str 'a string'"):
        call("a string")


# -- item 4: one strict set of coercion rules -----------------------------------------------------
@pytest.mark.parametrize("hint, value, expected", [
    (bool, True, True), (bool, "false", False), (bool, "1", True), (bool, 0, False),
    (int, 8, 8), (int, 8.0, 8), (int, "8", 8), (int, "8.0", 8),
    (float, 1, 1.0), (float, "0.1", 0.1),
    (tuple[str, ...], "qkv,fc1", ("qkv", "fc1")), (tuple[str, ...], ["qkv"], ("qkv",)),
    (tuple[int, ...], "1 4", (1, 4)),
    (int | None, "none", None), (int | None, None, None), (int | None, "3", 3),
])
def test_coercion_accepts(hint, value, expected):
    assert coerce(value, hint, "x") == expected
    assert type(coerce(value, hint, "x")) is type(expected)
    assert train_coerce(value, hint, "x") == expected  # the training options follow the same rules


@pytest.mark.parametrize("hint, value", [
    (bool, 2), (bool, "maybe"), (bool, 1.0), (int, 8.7), (int, "8.7"), (int, True),
    (int, "eight"), (float, "fast"), (float, False), (str, ["a"]), (tuple[int, ...], 5),
    (tuple[int, ...], "1,2.5"),
])
def test_coercion_refuses(hint, value):
    with pytest.raises(ValueError, match="option 'x'"):
        coerce(value, hint, "x")
    with pytest.raises(ValueError, match="option 'x'"):
        train_coerce(value, hint, "x")


def test_method_and_train_options_follow_the_same_rules(tmp_path):
    with pytest.raises(ValueError, match="'train_head' of method 'lora' expects true or false"):
        vpeft.make_config("lora", train_head=2)
    with pytest.raises(ValueError, match=r"'rank' of method 'lora' expects an integer, got 8\.7"):
        vpeft.adapt(tiny_model(), "lora", rank=8.7)
    assert vpeft.make_config("lora", rank=8.0).rank == 8
    base = {"model": "m", "data": "d", "method": "lora", "out": str(tmp_path)}
    with pytest.raises(ValueError, match="'hflip' expects true or false, got 2"):
        TrainConfig.from_dict({**base, "hflip": 2})
    with pytest.raises(ValueError, match=r"'epochs' expects an integer, got 2\.5"):
        TrainConfig.from_dict({**base, "epochs": 2.5})
    cfg = TrainConfig.from_dict({**base, "epochs": "3", "lr": 1, "hflip": "true"})
    assert (cfg.epochs, cfg.lr, type(cfg.lr), cfg.hflip) == (3, 1.0, float, True)


# -- item 5: options that contradict the config object --------------------------------------------
def test_conflicting_config_and_option_is_refused():
    with pytest.raises(ValueError, match=r"conflicting values.*rank=4 in the config but rank=8"):
        vpeft.adapt(tiny_model(), vpeft.LoRAConfig(rank=4), rank=8)
    same = vpeft.make_config(vpeft.LoRAConfig(rank=4), rank="4")  # the same value is fine
    assert same == vpeft.LoRAConfig(rank=4)
    with pytest.raises(TypeError, match="unknown option"):
        vpeft.make_config(vpeft.LoRAConfig(rank=4), rnk=4)


# -- item 6: batch sizes, precision, image size ---------------------------------------------------
@pytest.mark.parametrize("field, value", [("eval_batch_size", 0), ("batch_size", 0),
                                          ("num_workers", -1), ("img_size", 0)])
def test_zero_is_not_unset(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"{field} must be >= "):
        TrainConfig(model="m", data="d", method="lora", out=str(tmp_path), **{field: value})
    unset = TrainConfig(model="m", data="d", method="lora", out=str(tmp_path))
    assert unset.eval_batch_size is None


def test_evaluate_run_refuses_batch_size_zero(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_run(tmp_path, batch_size=0)


def test_fp16_on_a_cpu_falls_back_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="vpeft.engine.runtime"):
        assert resolve_precision("fp16", cpu=True) == "no"
    assert "fp16 needs a GPU" in caplog.text
    assert resolve_precision("bf16", cpu=True) == "bf16"  # CPU bf16 autocast exists
    assert resolve_precision("auto", cpu=True) == "no"


def test_fp16_run_on_a_cpu_records_what_it_used(tmp_path):
    data = write_list_dataset(tmp_path / "data", {"train800": 12, "val200": 4, "test": 6},
                              classes=2)
    arch, extra = TINY["vit"]
    results = train(TrainConfig(
        model=arch, model_args={**TINY_DIMS, **extra}, pretrained=False, data=str(data),
        method="linear", out=str(tmp_path / "run"), epochs=1, batch_size=8, num_workers=0,
        progress=False, precision="fp16", cpu=True))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (results["precision"], saved["precision"]) == ("no", "no")


def test_image_smaller_than_a_patch_is_refused():
    with pytest.raises(ValueError, match=r"img_size 8 is smaller than one 16x16-pixel patch"):
        build_backbone("vit_tiny_patch16_224", 3, pretrained=False, img_size=8)


def test_image_not_a_multiple_of_the_patch_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="vpeft.engine.model"):
        model = build_backbone("vit_tiny_patch16_224", 3, pretrained=False, img_size=40,
                               model_args={"depth": 1})
    assert "the last 8 pixels of every row and column are dropped (use 32 or 48)" in caplog.text
    assert model.patch_embed.grid_size == (2, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vpeft.engine.model"):
        build_backbone("vit_tiny_patch16_224", 3, pretrained=False, img_size=48,
                       model_args={"depth": 1})
    assert "dropped" not in caplog.text
