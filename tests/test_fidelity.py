"""Methods against their papers' official code (issue 10): AdaptFormer, VQT, VPT, side-tuning,
KAdaptation, Houlsby adapters, prefix-tuning; and a dead-parameter audit of those methods."""

from __future__ import annotations

import fnmatch

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from test_methods_issue4 import perturb, vit_base_count
from vpeft.methods.addition.adapter import AdapterConfig
from vpeft.methods.addition.side import SideBlend

from conftest import NUM_CLASSES, TINY_DIMS, tiny_model
from rows import all_rows

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4) % NUM_CLASSES


def tiny(**extra) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                             **TINY_DIMS, **extra).eval()


def block_inputs(block: nn.Module, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every input ``block`` receives during ``model(x)`` (VQT runs a block twice)."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model(x)
    handle.remove()
    return seen


# -- 1. AdaptFormer ------------------------------------------------------------------------------
def official_adaptformer_block(blk: nn.Module, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Block.forward`` of ShoufaChen/AdaptFormer with ``ffn_option='parallel'``, on timm parts."""
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    adapt_x = 0.1 * branch.up(branch.dropout(F.relu(branch.down(x))))  # input before norm2
    residual = x
    x = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return residual + x + adapt_x  # the branch is outside drop-path


def test_adaptformer_block_is_the_official_parallel_form():
    model = vpeft.adapt(tiny(), "adaptformer")
    perturb(model)  # up-projections off zero, so the branch matters
    wrapped = model.blocks[1]
    x = block_inputs(wrapped, model, X)[0]
    with torch.no_grad():
        ref = official_adaptformer_block(wrapped.base, wrapped.branch, x)
        torch.testing.assert_close(wrapped(x), ref)


def test_adaptformer_branch_survives_drop_path():
    """With drop-path 1 on block 1 the MLP's update is dropped; the branch, outside it, is not."""
    model = vpeft.adapt(tiny(drop_path_rate=1.0), "adaptformer", dropout=0.0)
    perturb(model)
    wrapped = model.blocks[1].train()
    x = block_inputs(wrapped, model, X)[0]
    with torch.no_grad():  # drop_path1 is 1.0 too: both residual updates are dropped
        torch.testing.assert_close(wrapped(x), x + 0.1 * wrapped.branch(x))


def test_adaptformer_norm_input_keeps_the_old_form():
    model = vpeft.adapt(tiny(), "adaptformer", input="norm")
    perturb(model)
    blk = model.blocks[0]
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        h = blk.norm2(x + blk.attn(blk.norm1(x)))
        mid = x + blk.attn(blk.norm1(x))
        torch.testing.assert_close(blk(x), mid + blk.mlp.base(h) + 0.1 * blk.mlp.branch(h))


def test_adaptformer_default_is_the_vtab_setting():
    """Bottleneck 8: 12 x (768 x 8 + 8 + 8 x 768 + 768) = 156,768, the 0.16M of the VTAB-1k
    tables; 64 gives the paper's 1.19M large-data setting."""
    assert vit_base_count("adaptformer") == 156_768
    assert vit_base_count("adaptformer", dim=64) == 1_189_632


# -- 2./3. VQT and VPT-deep: normalised features, dropout per sample ------------------------------
def test_vqt_l2_normalises_each_feature_group():
    model = vpeft.adapt(tiny(), "vqt", num_tokens=3)
    perturb(model)
    seen = []
    handle = model.head.base.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(X)
    handle.remove()
    groups = seen[0].split([48, 3 * 48, 3 * 48], dim=-1)  # pooled, block 0, block 1
    for g in groups:
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(4))


def test_vqt_without_normalisation_starts_as_the_base():
    base = tiny()
    with torch.no_grad():
        assert not vpeft.get_state(vpeft.adapt(tiny(), "vqt")).method.zero_init
        raw = vpeft.adapt(tiny(), "vqt", normalize=False)
        torch.testing.assert_close(raw(X), base(X))


def prompt_masks(tokens: torch.Tensor) -> torch.Tensor:
    return tokens == 0  # (B, n, D): where dropout zeroed the tokens


def first_two_masks(method: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = vpeft.adapt(tiny(), method, num_tokens=5, dropout=0.5).train()
    torch.manual_seed(0)
    if method == "vqt":
        tokens = block_inputs(model.blocks[0].base, model, X)[1]  # the queries' own pass
    else:
        tokens = block_inputs(model.blocks[1].base, model, X)[0][:, 1:6]  # after the class token
    masks = prompt_masks(tokens)
    assert masks.any(), "dropout dropped nothing"
    return masks[0], masks[1]


def per_parameter_dropout(prompt, batch, dropout, training, dtype):
    """The old form: one mask drawn on the (1, n, D) parameter, then expanded to the batch."""
    return F.dropout(prompt, dropout, training).to(dtype).expand(batch, -1, -1)


@pytest.mark.parametrize("method", ["vqt", "vpt-deep"])
def test_prompt_dropout_draws_a_mask_per_sample(method: str, monkeypatch):
    """Two images of one batch get different dropout masks on the same prompt/query tokens; the
    same check on the old per-parameter dropout sees one shared mask (so it would have failed)."""
    first, second = first_two_masks(method)
    assert not torch.equal(first, second)
    module = "vpeft.methods.addition." + ("vqt" if method == "vqt" else "vpt")
    monkeypatch.setattr(f"{module}.expand_prompt", per_parameter_dropout)
    first, second = first_two_masks(method)
    assert torch.equal(first, second)


# -- 4. side-tuning ------------------------------------------------------------------------------
def side_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    F.cross_entropy(model(X), Y).backward()
    return {n: p.grad for n, p in model.named_parameters() if ".side." in n}


def test_side_network_gets_gradient_on_the_first_step():
    grads = side_grads(vpeft.adapt(tiny(), "side-tune"))
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_side_tune_curriculum_decays_alpha_and_resumes(tmp_path):
    model = vpeft.adapt(tiny(), "side-tune", alpha=0.2, curriculum=4)
    blend = next(m for m in model.modules() if isinstance(m, SideBlend))
    assert blend.current_alpha() == 1.0  # before training: the base model
    with torch.no_grad():
        torch.testing.assert_close(model(X), tiny()(X))
    grads = side_grads(model)  # first training pass: alpha = 1 - 0.8 / 4
    assert all(g.abs().sum() > 0 for g in grads.values())
    model.eval()
    assert blend.current_alpha() == pytest.approx(0.8)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(X)
    model.eval()
    assert blend.current_alpha() == pytest.approx(0.2)  # and it stays there
    vpeft.save(model, tmp_path)
    restored = vpeft.load(tiny(), tmp_path)
    restored_blend = next(m for m in restored.modules() if isinstance(m, SideBlend))
    assert int(restored_blend.passes) == 6


# -- 5. KAdaptation ------------------------------------------------------------------------------
def kron_update_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight update as it runs in this mode, read off its outputs on a basis."""
    eye = torch.eye(layer.base.in_features)
    bias = layer.delta_bias()
    return (layer(eye) - layer.base(eye) - bias).T


def test_kadaptation_drops_half_of_the_update_while_training():
    model = vpeft.adapt(tiny(), "kadaptation", n=4)
    perturb(model)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        full = layer.delta_weight()
        torch.testing.assert_close(kron_update_matrix(layer), full, atol=1e-5, rtol=1e-4)
        layer.train()
        torch.manual_seed(0)
        dropped = kron_update_matrix(layer)
    q_and_v = torch.cat([full[:48], full[96:]])
    kept = torch.cat([dropped[:48], dropped[96:]])
    zero = kept.abs() < 1e-6
    assert 0.4 < zero.float().mean() < 0.6  # p = 0.5 over 4,608 entries
    torch.testing.assert_close(kept[~zero], 2 * q_and_v[~zero], atol=1e-5, rtol=1e-4)


def test_kadaptation_adds_q_update_after_the_attention_scaling():
    """Official: ``q = q / sqrt(d) + q_delta``; vpeft scales q's rows by ``sqrt(d)`` so that
    timm's ``q * d^-0.5`` gives exactly that, and leaves v's rows as they were."""
    torch.manual_seed(3)
    after = vpeft.adapt(tiny(), "kadaptation", n=4)
    torch.manual_seed(3)
    before = vpeft.adapt(tiny(), "kadaptation", n=4, q_after_scale=False)
    for m in (after, before):
        perturb(m)
    a, b = after.blocks[0].attn.qkv, before.blocks[0].attn.qkv
    sqrt_d = (48 // 3) ** 0.5
    with torch.no_grad():
        torch.testing.assert_close(a.delta_weight()[:48] * after.blocks[0].attn.scale,
                                   b.delta_weight()[:48])  # what the scaled q receives
        torch.testing.assert_close(a.delta_weight()[:48], sqrt_d * b.delta_weight()[:48])
        torch.testing.assert_close(a.delta_weight()[96:], b.delta_weight()[96:])
        torch.testing.assert_close(a.delta_bias()[:48], sqrt_d * b.delta_bias()[:48])


def test_kadaptation_share_fast_reuses_q_fast_weights_for_v():
    model = vpeft.adapt(tiny(), "kadaptation", n=4, share_fast=True, q_after_scale=False)
    perturb(model)
    layer = model.blocks[0].attn.qkv
    assert layer.fast_u.shape[0] == 1
    with torch.no_grad():
        slow = layer.slow["qkv_v"].left @ layer.slow["qkv_v"].right
        fast_q = layer.fast_u[0] @ layer.fast_v[0]
        expected = sum(torch.kron(slow[i], fast_q[i]) for i in range(4))
        torch.testing.assert_close(layer.delta_weight()[96:], layer.scale * expected)


# -- 6. Houlsby adapters train the LayerNorms -----------------------------------------------------
@pytest.mark.parametrize("train_norms", [True, False])
def test_adapter_train_norms(train_norms: bool):
    model = vpeft.adapt(tiny(), "adapter", train_norms=train_norms)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * TINY_DIMS["depth"] + 1
    assert all(p.requires_grad == train_norms for m in norms for p in m.parameters())
    assert AdapterConfig().train_norms  # the paper's form is the default


# -- 7. sizes of 0 are refused ------------------------------------------------------------------
@pytest.mark.parametrize("method,option", [
    ("prefix", "num_tokens"), ("vqt", "num_tokens"), ("vpt-deep", "num_tokens"),
    ("vpt-shallow", "num_tokens"), ("adapter", "dim"), ("adaptformer", "dim"),
    ("side-tune", "width"), ("kadaptation", "n"), ("kadaptation", "rank"),
])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_below_one_are_refused(method: str, option: str, value: int):
    with pytest.raises(ValueError, match=option):
        vpeft.adapt(tiny(), method, **{option: value})


def test_side_tune_refuses_an_alpha_that_freezes_the_side_network():
    with pytest.raises(ValueError, match="alpha"):
        vpeft.adapt(tiny(), "side-tune", alpha=1.0)


# -- 8. dead-parameter audit -----------------------------------------------------------------------
MINE = {"adaptformer", "vqt", "side-tune", "adapter", "vpt-shallow", "vpt-deep", "prefix",
        "kadaptation"}
# zero gradient at init where the math says so: a zero-initialised factor (up-projection, u_i,
# the head's columns on the query features) multiplies the gradient of the tensors before it
ZERO_AT_INIT = {
    "adapter": ("*.down.weight", "*.down.bias"),
    "adaptformer": ("*.down.weight", "*.down.bias"),
    "kadaptation": ("*.fast_v", "*.slow.*"),
    "vqt": ("*.query",),
}
AUDIT = [pytest.param(r, id=r.id) for r in all_rows() if r.method in MINE]


def nonzero_grads(model: nn.Module) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), Y).backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("row", AUDIT)
def test_every_trainable_tensor_gets_a_gradient(row):
    """With weight decay off, one backward gives every trainable tensor a non-zero gradient,
    except the tensors behind a zero-initialised factor, which must have one after a step."""
    model = vpeft.adapt(tiny_model("vit"), row.method, **row.options).train()
    first = nonzero_grads(model)
    allowed = ZERO_AT_INIT.get(row.method, ())
    dead = [n for n, ok in first.items() if not ok]
    unexplained = [n for n in dead if not any(fnmatch.fnmatch(n, p) for p in allowed)]
    assert not unexplained, f"no gradient at init: {unexplained}"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    opt.step()
    still_dead = [n for n, ok in nonzero_grads(model).items() if not ok]
    assert not still_dead, f"no gradient after one step: {still_dead}"
