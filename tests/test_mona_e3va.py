"""Mona and E3VA (issue 13): placement against hand-written references, the prefix-token path,
the frozen stream and the highway. The shared checks (counts, save/load, gradients, zero init,
memory saving) are their rows in ``tests/rows/dense.py``."""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft.core.surgery import Wrapper
from vpeft.methods.addition.mona import MonaLayer, MonaOp

from conftest import IMG, saved_bytes, tiny_model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def innermost(m: torch.nn.Module) -> torch.nn.Module:
    while isinstance(m, Wrapper):
        m = m.base
    return m


def randomize_(model: torch.nn.Module, name: str = "up") -> None:
    """Give every zero-initialised up-projection random weights, so the branches act."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_isolated_tokens_are_one_pixel_images():
    op = MonaOp(6)
    t = torch.randn(2, 3, 6)
    img = t.reshape(2 * 3, 6, 1, 1)  # each token a 1 x 1 image (zero padding)
    with torch.no_grad():
        torch.testing.assert_close(op.isolated(t), op(img).view(2, 3, 6))


def test_prefix_tokens_do_not_see_the_grid():
    layer = MonaLayer(8, 4, 0.0, zero_up=False).eval()
    x = torch.randn(1, 1 + 16, 8)
    y = x.clone()
    y[:, 1:] += torch.randn(1, 16, 8)  # other patch tokens, same class token
    a, b = layer(x, 1, (4, 4)), layer(y, 1, (4, 4))
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # patches do mix over the grid


def test_mona_on_a_vit_block_matches_the_official_placement():
    model = vpeft.adapt(tiny_model("vit"), "mona", dropout=0.0).eval()
    block = model.blocks[0]  # MonaBlock over the timm Block
    base, m1, m2 = block.base, block.base.norm2.mona, block.mona
    x = torch.randn(2, 1 + 16, 48)
    with torch.no_grad():
        h = x + base.ls1(base.attn(base.norm1(x)))
        h = h + m1(h, 1, (4, 4))  # mona1 after the attention's residual add
        y = h + base.ls2(base.mlp(base.norm2.base(h)))
        y = y + m2(y, 1, (4, 4))  # mona2 after the MLP's
        torch.testing.assert_close(block(x), y)


def test_mona_scaled_layernorm_starts_official():
    model = vpeft.adapt(tiny_model("swin"), "mona")
    layer = model.layers[1].blocks[0].mona
    assert torch.all(layer.gamma == 1e-6) and torch.all(layer.gammax == 1)
    assert layer.up.weight.abs().sum() > 0  # not zero-initialised, as the official code
    assert layer.down.out_features == 64 and layer.norm.normalized_shape == (32,)
    assert vpeft.get_state(model).method.zero_init is False


@pytest.mark.parametrize("kind", ["vit", "swin", "convnext"])
def test_e3va_blocks_run_on_the_frozen_stream(kind: str):
    """Each frozen block sees exactly the base model's input, without autograd; the block's place
    returns frozen + side, so readers of block outputs see the adapted features."""
    base = tiny_model(kind).eval()
    model = vpeft.adapt(tiny_model(kind), "e3va")
    randomize_(model)
    view = vpeft.get_view(base)
    seen: dict[str, list] = {"base_in": [], "base_out": [], "in": [], "out": []}

    def record(key: str, what):
        return lambda m, i, o: seen[key].append(what(i[0], o)) or None  # keep the output

    hooks = []
    for path in view.blocks:
        hooks += [
            base.get_submodule(path).register_forward_hook(record("base_in", lambda i, o: i)),
            base.get_submodule(path).register_forward_hook(record("base_out", lambda i, o: o)),
            innermost(model.get_submodule(path)).register_forward_hook(
                record("in", lambda i, o: (i, o.requires_grad))),
            model.get_submodule(path).register_forward_hook(record("out", lambda i, o: o)),
        ]
    x = images()
    with torch.no_grad():
        base(x)
    model.train()
    out = model(x)
    for h in hooks:
        h.remove()
    for (inp, needs_grad), ref in zip(seen["in"], seen["base_in"], strict=True):
        torch.testing.assert_close(inp, ref)  # the frozen stream is the base model's
        assert not needs_grad
    last = seen["out"][-1]
    assert last.requires_grad and not torch.allclose(last, seen["base_out"][-1])
    out.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters()
               if "adapters" not in n and not vpeft.get_view(model).in_head(n))


def test_e3va_highway_crosses_stages_through_the_frozen_downsample():
    """On Swin the side stream of stage 0 reaches stage 1 through the patch merging layer:
    s <- D(f + s) - D(f), with gradients back to the first stage's adapters."""
    model = vpeft.adapt(tiny_model("swin"), "e3va")
    randomize_(model)
    out = model(images())
    out.sum().backward()
    first = model.layers[0].blocks[0].adapters["mlp"].down.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert type(model.layers[1].downsample).__name__ == "HighwayDownsample"


def test_e3va_backbone_gets_no_gradient_even_if_unfrozen():
    model = vpeft.adapt(tiny_model("vit"), "e3va")
    randomize_(model)
    for p in model.blocks.parameters():
        p.requires_grad_(True)  # whatever requires grad: the blocks run under no_grad
    model(images()).sum().backward()
    got = [n for n, p in model.blocks.named_parameters() if p.grad is not None]
    assert got and all(".adapters." in n for n in got)


def test_methods_list_their_characteristics():
    rows = {m: vpeft.get_method(m).info() for m in ("mona", "e3va")}  # list_methods()' rows
    assert rows["mona"].mergeable is False and rows["mona"].memory_saving is False
    assert rows["e3va"].mergeable is False and rows["e3va"].memory_saving is True
    assert rows["e3va"].subfamily == "side" and rows["mona"].subfamily == "adapter"


def test_inapplicable_families_name_what_is_missing():
    with pytest.raises(vpeft.MissingPartError, match="mona"):
        vpeft.adapt(tiny_model("resnet"), "mona")  # no attention, no MLP
    with pytest.raises(vpeft.MissingPartError, match="downsampl"):
        vpeft.adapt(tiny_model("resnet"), "e3va")  # blocks change the width themselves
    with pytest.raises(vpeft.MissingPartError, match="attn"):
        vpeft.adapt(tiny_model("convnext"), "e3va", positions=("attn",))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="positions"):
        vpeft.adapt(tiny_model("vit"), "mona", positions=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        vpeft.adapt(tiny_model("vit"), "e3va", rank=0)


def test_mona_recompute_gives_the_same_gradients_and_keeps_less():
    """``recompute`` (the default) replays each Mona in the backward, dropout masks included:
    the same loss and gradients as keeping everything, with less kept."""
    x = images()
    runs = {}
    for recompute in (False, True):
        model = vpeft.adapt(tiny_model("vit"), "mona", recompute=recompute).train()
        randomize_(model)
        torch.manual_seed(0)  # the same dropout masks in both runs
        kept, out = saved_bytes(lambda m=model: m(x))
        out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[recompute] = kept, out, grads
    (kept_all, out_all, g_all), (kept_re, out_re, g_re) = runs[False], runs[True]
    torch.testing.assert_close(out_re, out_all, rtol=0, atol=0)
    assert g_re.keys() == g_all.keys()
    for n in g_all:
        torch.testing.assert_close(g_re[n], g_all[n], rtol=1e-6, atol=1e-7, msg=n)
    assert kept_re < 0.8 * kept_all
