"""The public API's contracts: configs, errors on bad input, checkpoints, targeting, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft
from vpeft.cli import main as cli
from vpeft.core.targeting import find_modules

from conftest import FOUNDATION, tiny_model


def test_adapt_by_name_or_config_is_the_same():
    a = vpeft.adapt(tiny_model(), "lora", rank=4)
    b = vpeft.adapt(tiny_model(), vpeft.LoRAConfig(rank=4))
    assert vpeft.get_state(a).config == vpeft.get_state(b).config
    assert vpeft.summary(a).trainable == vpeft.summary(b).trainable


def test_config_round_trips_through_json():
    cfg = vpeft.LoRAConfig(rank=4, targets=("qkv", "fc1"), qkv="qkv", alpha=8)
    again = vpeft.make_config("lora", **json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_cli_style_string_options_are_coerced():
    cfg = vpeft.make_config("lora", rank="16", dropout="0.1", targets="qkv,fc1", train_head="false")
    assert (cfg.rank, cfg.dropout, cfg.targets, cfg.train_head) == (16, 0.1, ("qkv", "fc1"), False)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(KeyError, match=r"unknown method 'lorra'.*lora"):
        vpeft.adapt(tiny_model(), "lorra")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnk'\].*'rank'"):
        vpeft.adapt(tiny_model(), "lora", rnk=4)


def test_bad_option_value_is_named():
    with pytest.raises(ValueError, match="rank"):
        vpeft.adapt(tiny_model(), "lora", rank=0)
    with pytest.raises(ValueError, match="expects int"):
        vpeft.make_config("lora", rank="eight")


def test_target_that_matches_nothing_says_what_exists():
    model = tiny_model()
    with pytest.raises(vpeft.TargetNotFoundError, match=r"'fc9'.*blocks\.\*\.mlp\.fc1"):
        vpeft.adapt(model, "lora", targets=("fc9",))


def test_targeting_patterns():
    model = tiny_model()
    assert find_modules(model, ["qkv"], torch.nn.Linear) == [
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
    ]
    assert find_modules(model, ["blocks.1.mlp.*"], torch.nn.Linear) == [
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    assert find_modules(model, [r"re:blocks\.0\..*fc\d"]) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]


def test_adapting_twice_is_refused():
    model = vpeft.adapt(tiny_model(), "bitfit")
    with pytest.raises(ValueError, match="already adapted with 'bitfit'"):
        vpeft.adapt(model, "lora")


def test_lora_updates_only_the_chosen_qkv_parts():
    model = vpeft.adapt(tiny_model(), "lora", rank=2, qkv="qv")
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B.normal_()
    d = qkv.base.in_features
    delta = qkv.delta_weight()
    assert delta[:d].abs().sum() > 0 and delta[2 * d :].abs().sum() > 0
    assert torch.equal(delta[d : 2 * d], torch.zeros_like(delta[d : 2 * d]))
    x = torch.randn(3, 5, d)
    torch.testing.assert_close(
        qkv(x), torch.nn.functional.linear(x, qkv.base.weight + delta, qkv.base.bias)
    )


def test_summary_counts_and_text():
    model = vpeft.adapt(tiny_model(), "lora", rank=2)
    s = vpeft.summary(model)
    assert s.added == s.trainable_no_head == 2 * 2 * (2 * 48 + 48 * 2)
    assert s.total == s.base_total + s.added
    text = str(s)
    assert "blocks.*.attn.qkv.lora_A" in text and "trainable params" in text


def test_save_never_overwrites_silently(tmp_path):
    model = vpeft.adapt(tiny_model(), "bitfit")
    vpeft.save(model, tmp_path)
    with pytest.raises(FileExistsError):
        vpeft.save(model, tmp_path)
    vpeft.save(model, tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


def test_checkpoint_holds_only_trained_and_added_tensors(tmp_path):
    from safetensors.torch import load_file

    model = vpeft.adapt(tiny_model(), "lora", rank=2)
    vpeft.save(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter.safetensors"))
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in k or k.startswith("head.") for k in keys)


def test_load_refuses_another_architecture(tmp_path):
    vpeft.save(vpeft.adapt(tiny_model("vit"), "lora"), tmp_path)
    with pytest.raises(vpeft.CheckpointError, match="made for vit_tiny_patch16_224"):
        vpeft.load(tiny_model("deit-distilled"), tmp_path)


def test_load_refuses_other_shapes_and_class_counts(tmp_path):
    import timm

    vpeft.save(vpeft.adapt(tiny_model("vit"), "lora"), tmp_path)
    wider = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=96,
        depth=2,
        num_heads=3,
        num_classes=5,
    )
    with pytest.raises(vpeft.CheckpointError, match="other layer shapes"):
        vpeft.load(wider, tmp_path)
    other_head = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=7,
    )
    with pytest.raises(vpeft.CheckpointError, match="5-class head"):
        vpeft.load(other_head, tmp_path)
    assert vpeft.get_state(other_head, required=False) is None, "a failed load must not adapt"


def test_load_refuses_another_method_config(tmp_path):
    vpeft.save(vpeft.adapt(tiny_model(), "lora", rank=4), tmp_path)
    with pytest.raises(vpeft.CheckpointError, match=r"adapted with lora.*rank.*8"):
        vpeft.load(vpeft.adapt(tiny_model(), "lora", rank=8), tmp_path)


def test_load_reports_corrupt_files(tmp_path):
    vpeft.save(vpeft.adapt(tiny_model(), "lora"), tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(vpeft.CheckpointError, match="cannot read"):
        vpeft.load(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(vpeft.CheckpointError, match="not valid JSON"):
        vpeft.load(tiny_model(), tmp_path)
    with pytest.raises(vpeft.CheckpointError, match="missing"):
        vpeft.load(tiny_model(), tmp_path / "nowhere")


def test_merge_of_unmergeable_method_is_explained():
    with pytest.raises(vpeft.NotMergeableError, match="'adapter' is not mergeable"):
        vpeft.merge(vpeft.adapt(tiny_model(), "adapter"))


def test_merged_model_is_plain_timm(tmp_path):
    import timm

    model = vpeft.adapt(tiny_model(), "lora")
    merged = vpeft.merge(model)
    assert not any(isinstance(m, vpeft.core.surgery.Wrapper) for m in merged.modules())
    assert type(merged) is type(tiny_model())
    assert isinstance(merged.blocks[0].attn.qkv, torch.nn.Linear)
    assert timm.models.vision_transformer.VisionTransformer in type(merged).__mro__


def test_vpt_prompts_do_not_reach_the_head():
    base = tiny_model("deit-distilled")
    model = vpeft.adapt(tiny_model("deit-distilled"), "vpt-deep", num_tokens=3)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == base.forward_features(x).shape  # (B, 2 + 16, D)
    seen: list[int] = []
    blk = model.blocks[1]
    h = blk.base.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model(x)
    h.remove()
    assert seen == [2 + 3 + 16]


def test_cli_methods_json(capsys):
    assert cli(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {m.name for m in vpeft.list_methods()} == names
    assert set(FOUNDATION) <= names
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["family"] == "partial" and lora["mergeable"] is True


def test_cli_methods_table(capsys):
    assert cli(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "reparameterization" in out and "mergeable" in out
