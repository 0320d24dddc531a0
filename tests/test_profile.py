"""The profiler measures what it says, on a tiny model (timings are not asserted, only sanity)."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft
from vpeft.bench.profile import (
    ProfileSpec,
    build,
    floor_step,
    flops_per_image,
    profile,
    step_flops,
    train_step,
)
from vpeft.cli import main as cli

from conftest import TINY_DIMS, tiny_model

TINY_ARGS = {k: v for k, v in TINY_DIMS.items() if k != "img_size"}


def spec(**kw) -> ProfileSpec:
    return ProfileSpec(
        model="vit_tiny_patch16_224",
        img_size=32,
        batch_size=4,
        num_classes=5,
        warmup=1,
        repeats=2,
        model_args=TINY_ARGS,
        **kw,
    )


def test_profile_reports_counts_flops_and_ratios():
    result = profile(spec(memory=False), [("lora", {"rank": 2}), ("adapter", {}), ("full", {})])
    lora, adapter, full = result["methods"]
    assert lora["trainable_params_no_head"] == 2 * 2 * (2 * 48 + 48 * 2)
    assert lora["latency_ratio_merged"] is not None and adapter["latency_ratio_merged"] is None
    assert lora["gflops_per_image"] > result["floor"]["base_gflops_per_image"] > 0
    assert all(r["step_ratio_floor"] > 0 for r in result["methods"])
    # training FLOPs: full fine-tuning adds every weight gradient (about one more backward);
    # LoRA's rank-2 products add little (and it needs no input gradient in the first block)
    assert full["train_flops_ratio_floor"] > 1.3 > 1.1 > lora["train_flops_ratio_floor"] > 0.8
    assert result["floor"]["train_gflops_per_image"] > result["floor"]["base_gflops_per_image"]


def test_step_flops_counts_forward_and_the_weight_gradient_by_hand():
    x, y = torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 7))
    fwd = 2 * 5 * 48 * 7
    assert step_flops(train_step(model, x, y)) == 2 * fwd  # forward + weight gradient
    model[1].weight.requires_grad_(False)  # only the bias trains: no product in the backward
    assert step_flops(train_step(model, x, y)) == fwd


@pytest.mark.parametrize("groups", [1, 4])
def test_step_flops_of_a_grouped_conv_count_each_gradient_once(groups):
    """PyTorch's formula counts a grouped conv's weight gradient ``groups`` times; ours once."""
    x, y = torch.randn(2, 4, 6, 6), torch.tensor([0, 1])
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=False)
    model = torch.nn.Sequential(conv, torch.nn.Flatten())
    fwd = 2 * 2 * 4 * (4 // groups) * 9 * 36  # batch x out channels x in per group x k^2 x HW
    assert step_flops(train_step(model, x, y)) == 2 * fwd  # forward + weight gradient


def test_flop_count_matches_hand_count_for_a_linear_layer():
    assert (
        flops_per_image(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7)), 4)
        == 2 * 48 * 7
    )


def test_floor_computes_no_weight_gradient_but_reaches_block_zero():
    model = tiny_model()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(inp=i[0]))
    step = floor_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    step()
    assert all(p.grad is None for p in model.parameters())
    assert seen["inp"].requires_grad


def test_memory_probe_runs_in_a_subprocess():
    result = profile(spec(memory=True), [("linear", {})])
    lin, floor = result["methods"][0], result["floor"]
    assert lin["peak_memory_mb"] > lin["train_memory_mb"] >= 0
    assert floor["peak_memory_mb"] > 0 and floor["memory_measure"].startswith("cpu")


def test_cli_profile_writes_json_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = [
        "profile",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--num-classes",
        "5",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--method",
        "bitfit",
        "--out",
        str(out),
        "--model-args",
        *[f"{k}={v}" for k, v in TINY_ARGS.items()],
    ]
    assert cli(argv) == 0
    row = json.loads(out.read_text())["methods"][0]
    assert row["method"] == "bitfit" and row["step_ms"] > 0
    assert "bitfit" in capsys.readouterr().out
    assert cli(argv) == 2  # exists: refused with a message, not overwritten


def test_hf_lora_matches_vpeft_lora_on_full_qkv():
    """The peer baseline computes the same function as vpeft's lora given the same factors."""
    pytest.importorskip("peft", reason="hf:lora needs the optional peft package")
    ours = vpeft.adapt(tiny_model(), "lora", rank=2, qkv="qkv")
    theirs = vpeft.adapt(tiny_model(), "hf-lora", r=2, lora_alpha=2, target_modules="qkv")
    with torch.no_grad():
        for i in range(2):
            mine = ours.blocks[i].attn.qkv
            peer = theirs.blocks[i].attn.qkv
            a, b = torch.randn_like(peer.lora_A["default"].weight), torch.randn(144, 2)
            peer.lora_A["default"].weight.copy_(a)
            peer.lora_B["default"].weight.copy_(b)
            mine.lora_A.copy_(a.repeat(3, 1))  # vpeft keeps an A per part (q, k, v)
            mine.lora_B.copy_(b)  # and B's rows in part order, as PEFT's single B
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_profile_without_training_times_only_inference():
    result = profile(spec(memory=False, train=False), [("lora", {"rank": 2})])
    row = result["methods"][0]
    assert row["step_ms"] is None and result["floor"]["step_ms"] is None
    assert row["latency_ratio_merged"] > 0


def test_flops_count_every_method_and_leave_trainable_flags_alone():
    """``--all`` counts FLOPs of every method; token methods expand trainable prompts, which the
    FLOP counter's module tracker cannot follow under no_grad unless the model is frozen."""
    base = flops_per_image(tiny_model(), TINY_DIMS["img_size"])
    for info in vpeft.list_methods():
        if info.name == "kadaptation" or info.requires:  # n=32 does not divide 48; optional dep
            continue
        try:
            model = vpeft.adapt(tiny_model(), info.name)
        except vpeft.MissingPartError:  # a method for another family (conv-adapter: CNN stages)
            continue
        flags = [p.requires_grad for p in model.parameters()]
        flops = flops_per_image(model, TINY_DIMS["img_size"])
        # an adapted model computes at least what the base does (counted, not zero or broken)
        assert flops >= base, (info.name, flops, base)
        assert flags == [p.requires_grad for p in model.parameters()], info.name


def test_every_candidate_runs_right_after_its_reference():
    from vpeft.bench.profile import interleaved_times

    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("floor", "a", "b")}
    t = interleaved_times(fns, "floor", warmup=1, repeats=3, device=torch.device("cpu"))
    assert calls == ["floor", "a", "floor", "b"] * 4
    assert len(t.times["floor"]) == 6 and len(t.ratios["a"]) == len(t.ratios["b"]) == 3
    assert "floor" not in t.ratios and t.ratio("a") > 0


def test_profile_builds_a_cnn_that_takes_no_img_size():
    """A ConvNeXt has no img_size argument: the profiler builds it like ``vpeft train`` does."""
    cnn = ProfileSpec(model="convnext_atto", img_size=32, batch_size=2, num_classes=5, warmup=1,
                      repeats=1, memory=False, train=False,
                      model_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    row = profile(cnn, [("bitfit", {})])["methods"][0]
    assert row["trainable_params_no_head"] == sum(  # BitFit: every bias but the classifier's
        p.numel() for n, p in build(cnn).named_parameters()
        if n.endswith("bias") and not n.startswith("head.fc"))
    assert row["latency_ratio_merged"] > 0


def test_profile_reports_a_method_that_does_not_apply_and_goes_on():
    """``--all`` on a CNN: a method needing tokens is listed as not applicable, naming the
    missing part, and the methods that apply are still profiled."""
    cnn = ProfileSpec(model="convnext_atto", img_size=32, batch_size=2, num_classes=5, warmup=0,
                      repeats=1, memory=False, train=False,
                      model_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    result = profile(cnn, [("vpt-deep", {}), ("bitfit", {})], skip_inapplicable=True)
    assert [r["method"] for r in result["methods"]] == ["bitfit"]
    assert list(result["skipped"]) == ["vpt-deep"]
    assert "sequence_tokens" in result["skipped"]["vpt-deep"]
