"""Backbone families: views found by structure, every injected module on the forward path, every
method either adapting each family or naming the part it lacks."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft
from vpeft.backbones.catalog import compatibility
from vpeft.cli import main
from vpeft.core.forward_check import BypassedModuleError, check_forward_path
from vpeft.core.surgery import wrap
from vpeft.methods.partial.lora import LoRALinear

from conftest import IMG, NUM_CLASSES, TINY, kinds_of, tiny_model
from rows import all_rows

FAMILY_KINDS = [k for k in TINY if k not in ("vit", "deit-distilled", "vit-avgpool-reg")]
OPTIONS = {}  # method -> the options of its first matrix row (sized for the tiny models)
for _row in all_rows():
    OPTIONS.setdefault(_row.method, _row.options)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def test_views_found_by_structure():
    families = {k: vpeft.get_view(tiny_model(k)).family for k in TINY}
    assert families["eva"] == families["eva-separate"] == "eva"
    assert families["swin"] == families["swinv2"] == "swin"
    assert families["convnext"] == "convnext"
    assert families["vit-ls-prenorm"] == families["vit-nobias"] == "vit"


def test_swin_block_dims_follow_the_stages():
    view = vpeft.get_view(tiny_model("swin"))
    assert view.blocks == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                           "layers.1.blocks.1"]
    assert view.block_dims == [16, 16, 32, 32]
    assert not view.sequence_tokens and view.num_prefix_tokens == 0


def test_eva_views_name_fused_or_separate_projections():
    fused, separate = vpeft.get_view(tiny_model("eva")), vpeft.get_view(tiny_model("eva-separate"))
    assert fused.qkv == "attn.qkv" and fused.qkv_separate is None
    assert separate.qkv is None
    assert separate.separate_qkv_paths("qv") == {"blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                                                 "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"}


@pytest.mark.parametrize("kind", ["eva", "swinv2"])
def test_forward_check_names_a_bypassed_wrapper(kind: str):
    """timm's EVA and SwinV2 read ``qkv.weight`` with F.linear when they have q/v biases: a
    wrapper of ``qkv`` is never called, and the check says which one."""
    model = tiny_model(kind)
    view = vpeft.get_view(model)
    path = view.block_part(0, "qkv")
    wrap(model, path, lambda m: LoRALinear(m, 2, 1.0, 0.0, [(0, m.out_features)]))
    with pytest.raises(BypassedModuleError, match=path.replace(".", r"\.")):
        check_forward_path(model, view, "lora")
    view.prepare_model()  # the view routes the bias after qkv(x): now it is called
    check_forward_path(model, view, "lora")


@pytest.mark.parametrize("kind", ["eva", "eva-separate", "swinv2"])
def test_lora_on_the_attention_changes_the_output_and_merges_exactly(kind: str):
    base = tiny_model(kind)
    model = vpeft.adapt(tiny_model(kind), "lora", rank=2)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == (2 * len(vpeft.get_view(model).blocks) if kind == "eva-separate"
                         else len(vpeft.get_view(model).blocks))
    with torch.no_grad():
        for m in lora:
            m.lora_B.normal_()
    x = images()
    with torch.no_grad():  # features: the random head's logits are too small to compare
        out, ref = model.forward_features(x), base.forward_features(x)
    assert (out - ref).abs().max() > 1e-2 * ref.abs().max(), "the LoRA update has no effect"
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.arange(2) % NUM_CLASSES).backward()
    assert all(m.lora_A.grad.abs().sum() > 0 for m in lora)
    merged = vpeft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_lora_on_separate_projections_adapts_q_and_v_only():
    model = vpeft.adapt(tiny_model("eva-separate"), "lora", qkv="qv")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj",
                       "blocks.1.attn.v_proj"]


def test_eva_prompts_get_no_rotary_position():
    """VPT's prompts sit between the class token and the patches; EVA rotates the last
    len(rope) tokens only, so the prompts count as prefix tokens and each patch keeps its
    rotary position (without this the forward fails on the sequence length)."""
    model = vpeft.adapt(tiny_model("eva"), "vpt-deep", num_tokens=3)
    with torch.no_grad():
        assert model(images()).shape == (2, NUM_CLASSES)
    assert model.blocks[0].attn.num_prefix_tokens == 1 + 3


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("method", sorted(m.name for m in vpeft.list_methods()))
def test_every_method_runs_or_names_the_missing_part(method: str, kind: str):
    """Adapt, forward and backward; or a MissingPartError that names method and family."""
    try:
        model = vpeft.adapt(tiny_model(kind), method, **OPTIONS.get(method, {}))
    except vpeft.MissingPartError as e:
        family = vpeft.get_view(tiny_model(kind)).family
        assert f"'{method}'" in str(e) and f"view '{family}'" in str(e), str(e)
        return
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images()), torch.arange(2) % NUM_CLASSES)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_compatibility_table_comes_from_adapting():
    cells = {(c.method, c.family): c for c in compatibility(["lora", "vpt-deep"], ["swin", "vit"])}
    assert cells[("lora", "swin")].works and cells[("vpt-deep", "vit")].works
    vpt = cells[("vpt-deep", "swin")]
    assert not vpt.works and not vpt.error and vpt.missing == "sequence_tokens"


def test_methods_backbones_cli_has_no_errors(capsys):
    assert main(["methods", "--backbones", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    errors = [c for c in cells if c["error"]]
    assert not errors, errors
    assert {c["method"] for c in cells} == {m.name for m in vpeft.list_methods()}
    assert {"vit", "eva", "swin", "convnext"} <= {c["family"] for c in cells}


def test_kinds_of_groups_by_view_family():
    assert kinds_of("swin") == ("swin", "swinv2")
