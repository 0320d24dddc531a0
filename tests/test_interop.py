"""Hugging Face PEFT inside vpeft: ``hf:<tuner>`` methods, export to PEFT's folder layout,
PEFT folders loaded by ``vpeft.load``, and the model card beside every adapter."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft
from datagen import write_list_dataset
from vpeft.cli import main
from vpeft.engine.evaluate import load_run
from vpeft.engine.rundir import RunDir

from conftest import IMG, TINY_DIMS, WEIGHTS, real_deit, tiny_model

peft = pytest.importorskip("peft", reason="hf:<tuner> and PEFT folders need the peft package")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from vpeft.interop.peft_format import NotExpressibleError, export_peft  # noqa: E402
from vpeft.methods.peft_bridge import tuner_layers  # noqa: E402

X = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor a random offset, as training would (B leaves zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_hf_names_resolve_options_are_the_tuners_and_the_head_is_never_a_target():
    assert vpeft.get_method("hf-lora") is vpeft.get_method("hf:lora")  # the old name
    assert vpeft.get_method("HF:LoHa").name == "hf:loha"
    with pytest.raises(KeyError, match="hf:lokr"):  # unknown tuner: the valid ones are listed
        vpeft.get_method("hf:no-such-tuner")
    with pytest.raises(TypeError, match=r"'lora_alpha'.*'r'"):  # unknown key: the tuner's keys
        vpeft.adapt(tiny_model(), "hf:lora", rank=4)
    model = vpeft.adapt(tiny_model(), "hf:lora", r=2, lora_alpha=8)
    paths = [p for p, _ in tuner_layers(model)]
    assert paths == [f"blocks.{i}.{n}" for i in range(2)
                     for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert model.blocks[0].attn.qkv.scaling["default"] == 4.0  # lora_alpha / r reached PEFT
    cnn = vpeft.adapt(tiny_model("resnet"), "hf:lora", r=2)
    assert [p for p, _ in tuner_layers(cnn)] == vpeft.get_view(tiny_model("resnet")).convs
    only = vpeft.adapt(tiny_model(), "hf:lora", r=2, target_modules="qkv")
    assert [p for p, _ in tuner_layers(only)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_characteristics_are_measured_not_claimed():
    lora = vpeft.get_state(vpeft.adapt(tiny_model(), "hf:lora", r=2)).method
    assert lora.zero_init and lora.mergeable and lora.structure_preserving
    assert not lora.inference_overhead
    # FourierFT starts from a random spectrum (init_weights=False): not the base model's outputs
    fourier = vpeft.get_state(vpeft.adapt(tiny_model(), "hf:fourierft", n_frequency=50)).method
    assert not fourier.zero_init and fourier.mergeable
    zeroed = vpeft.adapt(tiny_model(), "hf:fourierft", n_frequency=50, init_weights=True)
    assert vpeft.get_state(zeroed).method.zero_init
    # the listing measures the same on its probe
    rows = {r.name: r for r in vpeft.list_methods()}
    assert rows["hf:ia3"].mergeable and not rows["hf:ia3"].inference_overhead
    assert rows["hf:lora"].requires == ("peft",)


@pytest.mark.parametrize("kind,method,options", [
    ("vit", "lora", {"rank": 2, "qkv": "qv"}),  # the paper's q/v form on a fused qkv
    ("vit", "lora", {"rank": 2, "alpha": 6, "qkv": "qv", "targets": ("qkv", "fc1")}),  # mixed
    ("vit", "dora", {"rank": 2}),  # DoRA on q and v of the fused qkv
    ("resnet", "lora", {"rank": 2}),  # conv pairs
], ids=["lora-qv", "lora-mixed-ranks", "dora-qv", "lora-conv"])
def test_export_loads_in_peft_with_the_same_outputs(kind, method, options, tmp_path):
    model = vpeft.adapt(tiny_model(kind), method, **options)
    perturb(model)
    out = export_peft(model.eval(), tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["fc" if kind == "resnet"
                                                                    else "head"]
    assert cfg["use_dora"] == (method == "dora") and cfg["target_modules"]
    assert (out / "adapter_model.safetensors").is_file()
    assert "Exported to Hugging Face PEFT" in (out / "README.md").read_text()
    theirs = PeftModel.from_pretrained(tiny_model(kind), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), model(X), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_peft_cannot_express(tmp_path):
    with pytest.raises(NotExpressibleError, match=r"'ssf' cannot be exported to PEFT"):
        export_peft(vpeft.adapt(tiny_model(), "ssf"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_vpeft_load_reads_a_peft_lora_folder(tmp_path):
    made = get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc2"],
                                                   modules_to_save=["head"]))
    perturb(made)
    made.save_pretrained(str(tmp_path / "peft"))
    theirs = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "peft")).eval()
    ours = vpeft.load(tiny_model(), tmp_path / "peft").eval()
    assert vpeft.get_state(ours).config.method == "hf:lora"
    with torch.no_grad():
        ref = theirs(X)
        torch.testing.assert_close(ours(X), ref, rtol=1e-5, atol=1e-5)
        # now an ordinary vpeft adapter: merge and a vpeft save/load round trip
        torch.testing.assert_close(vpeft.merge(ours)(X), ref, rtol=1e-5, atol=1e-5)
        vpeft.save(ours, tmp_path / "vpeft")
        torch.testing.assert_close(vpeft.load(tiny_model(), tmp_path / "vpeft")(X), ref,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(vpeft.CheckpointError, match="already adapted"):
        vpeft.load(ours, tmp_path / "peft")


def test_model_card_by_save_and_with_the_runs_results(tmp_path):
    model = vpeft.adapt(tiny_model(), "lora", rank=2)
    vpeft.save(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    for expected in ("vit_tiny_patch16_224", "`lora`", '"rank": 2', "trainable parameters",
                     "## Command", "vpeft.load"):
        assert expected in card, expected
    RunDir(tmp_path).write_results({"data": "/d/cifar", "split": "test", "top1": 71.25})
    card = (tmp_path / "README.md").read_text()
    assert "| top1 | 71.25 |" in card and "| data | /d/cifar |" in card
    (tmp_path / "README.md").write_text("my own notes\n")  # the user's README stays
    vpeft.save(model, tmp_path, overwrite=True)
    assert (tmp_path / "README.md").read_text() == "my own notes\n"


def test_cli_trains_hf_tuner_and_exports_a_run(tmp_path, capsys):
    data = write_list_dataset(tmp_path / "data", {"train800": 8, "val200": 4, "test": 6},
                              classes=3)
    tiny = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args",
            *[f"{k}={v}" for k, v in TINY_DIMS.items()], "--epochs", "1", "--batch-size", "4",
            "--num-workers", "0", "--data", str(data)]
    assert main(["train", *tiny, "--method", "hf:lora", "--method-args", "r=2",
                 "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "hf:lora" in card and "| top1 |" in card and "vpeft train --config" in card
    assert main(["eval", "--run", str(tmp_path / "hf"), "--num-workers", "0"]) == 0
    capsys.readouterr()
    assert main(["train", *tiny, "--method", "hf:lora", "--method-args", "rank=2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "'lora_alpha'" in capsys.readouterr().err  # the tuner's keys are listed
    assert main(["train", *tiny, "--method", "lora", "--method-args", "rank=2,qkv=qv",
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "peft",
                 "--out", str(tmp_path / "peft")]) == 0
    model, _, _ = load_run(tmp_path / "run")
    base, _, _ = load_run(tmp_path / "run")
    theirs = PeftModel.from_pretrained(_plain(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), model.eval()(X), rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "no")]) == 2


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The run's base model (the same random init) without its adapter."""
    from vpeft.core.state import STATE_ATTR
    from vpeft.core.surgery import replace_module, wrappers

    for path, w in wrappers(model):
        replace_module(model, path, w.base)
    model.__dict__.pop(STATE_ATTR)
    return model


def test_eval_runs_a_peft_folder_as_peft_computes_it(tmp_path, capsys):
    from vpeft.data import data_config, eval_transform, open_dataset

    model = vpeft.adapt(real_deit(num_classes=3), "lora", rank=2, qkv="qv")  # skips without
    perturb(model)
    export_peft(model.eval(), tmp_path / "peft")
    data = write_list_dataset(tmp_path / "data", {"train800": 2, "val200": 2, "test": 4},
                              classes=3)
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "peft"), "--data", str(data), "--weights",
                 str(WEIGHTS), "--predictions", "--num-workers", "0", "--cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    theirs = PeftModel.from_pretrained(real_deit(num_classes=3), str(tmp_path / "peft")).eval()
    dataset = open_dataset(str(data), "test")
    dataset.transform = eval_transform(data_config(theirs.base_model.model, None))
    with torch.no_grad():
        expected = [theirs(dataset[i][0][None]).argmax(-1).item() for i in range(len(dataset))]
    assert result["predictions"] == expected and result["method"] == "hf:lora"

