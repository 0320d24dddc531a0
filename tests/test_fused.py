"""The fast paths used in training (fused LoRA function, in-place slice updates) compute exactly
what the plain autograd formulation computes: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vpeft.core.inject import LinearUpdate, add_to_slices, output_parts
from vpeft.methods.partial.lora import LoRALinear, part_blocks


def _lora(parts_of: str, bias: bool = True, dropout: float = 0.0, scale: float = 2.0,
          dtype: torch.dtype = torch.float64) -> LoRALinear:
    torch.manual_seed(0)
    fused = parts_of != "all"
    base = nn.Linear(12, 36, bias=bias).to(dtype)
    parts = output_parts(36, parts_of, fused) if fused else [(0, 36)]
    m = LoRALinear(base, rank=3, scale=scale, dropout=dropout, parts=parts)
    with torch.no_grad():
        m.lora_B.normal_()  # B starts at zero: give it values so every gradient is non-trivial
    base.requires_grad_(False)
    return m


def _reference(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The update written with plain tensor algebra, independent of both code paths."""
    y = m.base(x)
    u = x @ m.lora_A.t()
    r, row, out = m.rank, 0, [y]
    delta = torch.zeros_like(y)
    for i, (s, e) in enumerate(m.parts):
        part = m.scale * u[..., i * r : (i + 1) * r] @ m.lora_B[row : row + e - s].t()
        delta = delta + nn.functional.pad(part, (s, y.shape[-1] - e))
        row += e - s
    out.append(delta)
    return out[0] + out[1]


def _grads(m: nn.Module, x: torch.Tensor, fn) -> list[torch.Tensor]:
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    tensors = [out.detach(), *(p.grad for p in m.parameters() if p.requires_grad)]
    return tensors + ([x.grad] if x.requires_grad else [])


@pytest.mark.parametrize("parts_of", ["qv", "k", "qkv", "all"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_lora_matches_plain_autograd(parts_of, bias, x_grad, train_base):
    m = _lora(parts_of, bias=bias)
    m.base.requires_grad_(train_base)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    fused = _grads(m, x, m)
    generic = _grads(m, x, lambda t: LinearUpdate.forward(m, t))
    plain = _grads(m, x, lambda t: _reference(m, t))
    assert len(fused) == len(plain) == 3 + x_grad + (1 + bias) * train_base
    for a, b, c in zip(fused, generic, plain, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_fused_lora_gradcheck():
    m = _lora("qv")
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    params = (m.lora_A, m.lora_B)
    assert torch.autograd.gradcheck(lambda t, *_: m(t), (x, *params))


def test_fused_lora_with_dropout_masks_only_the_branch():
    m = _lora("qv", dropout=0.5).train()
    x = torch.randn(64, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    fused = _grads(m, x, m)
    torch.manual_seed(1)
    generic = _grads(m, x, lambda t: LinearUpdate.forward(m, t))
    for a, b in zip(fused, generic, strict=True):
        torch.testing.assert_close(a, b)
    # the base path is not dropped: with B = 0 the output is exactly the base's
    with torch.no_grad():
        m.lora_B.zero_()
    torch.testing.assert_close(m(x), m.base(x))


def test_fused_lora_under_cpu_autocast_matches_fp32():
    m = _lora("qv", dtype=torch.float32)
    x = torch.randn(3, 9, 12)
    want = _grads(m, x, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for p in m.parameters():
            p.grad = None
        out = m(x)
        assert out.dtype == torch.bfloat16
    out.float().backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    assert m.lora_A.grad.dtype == m.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), want[0], rtol=0.05, atol=0.1)
    torch.testing.assert_close(m.lora_B.grad, want[2], rtol=0.05, atol=0.5)


def test_lora_on_a_hooked_linear_takes_the_generic_path():
    m = _lora("qv")
    x = torch.randn(4, 12, dtype=torch.float64)
    want = _reference(m, x)
    seen = []
    m.base.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    torch.testing.assert_close(m(x), want)
    assert seen == [(4, 36)]  # the base's hook ran, once


def test_add_to_slices_gradients_are_views_of_the_output_gradient():
    y0 = torch.randn(4, 10, requires_grad=True)
    d1 = torch.randn(4, 3, requires_grad=True)
    d2 = torch.randn(4, 2, requires_grad=True)
    out = add_to_slices(y0 * 1, [(0, 3), (7, 9)], [d1, d2])
    want = y0.detach().clone()
    want[:, 0:3] += d1.detach()
    want[:, 7:9] += d2.detach()
    torch.testing.assert_close(out.detach(), want)
    g = torch.randn(4, 10)
    out.backward(g)
    torch.testing.assert_close(y0.grad, g)
    torch.testing.assert_close(d1.grad, g[:, 0:3])
    torch.testing.assert_close(d2.grad, g[:, 7:9])


def test_add_to_slices_refuses_an_output_needed_by_its_own_backward():
    x = torch.randn(4, 6, requires_grad=True)
    y = x.exp()  # exp's backward needs its output: writing into it must be caught
    out = add_to_slices(y, [(0, 2)], [torch.ones(4, 2)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("method", ["lora", "fact-tt", "fact-tk"])
def test_activation_path_equals_the_weight_path(method):
    """Methods that can run either as ``base(x) + update`` or as ``x (W + dW)^T`` (FacT switches
    with dropout) give the same outputs and gradients both ways."""
    from tests.conftest import tiny_model

    import vpeft

    # float64: the two paths sum in different orders, so float32 differs by rounding alone
    model = vpeft.adapt(tiny_model(), method, dropout=0.0).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    layers = [m for m in model.modules() if isinstance(m, LinearUpdate)]
    assert layers
    for m in layers:
        x = torch.randn(3, 7, m.base.in_features, dtype=torch.float64, requires_grad=True)

        def through_weight(t, m=m):
            db = m.delta_bias()
            bias = m.base.bias if db is None else (db if m.base.bias is None else m.base.bias + db)
            return nn.functional.linear(t, m.base.weight + m.delta_weight(), bias)

        def activations(t, m=m):
            rows = t.reshape(-1, t.shape[-1])
            return m.update(rows, m.base(rows)).view(*t.shape[:-1], -1)

        for a, b in zip(_grads(m, x, activations), _grads(m, x, through_weight), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_on_the_fused_lora_output_matches_its_generic_path(detach_norm):
    from vpeft.methods.partial.dora import DoRALinear

    torch.manual_seed(0)
    base = nn.Linear(12, 36).double().requires_grad_(False)
    m = DoRALinear(base, 3, 2.0, 0.0, output_parts(36, "qv", True), detach_norm)
    with torch.no_grad():
        m.lora_B.normal_()
        m.magnitude.mul_(1.5)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = _grads(m, x, m)
    generic = _grads(m, x, lambda t: LinearUpdate.forward(m, t))
    assert len(fused) == 5  # output, A, B, magnitude, x
    for a, b in zip(fused, generic, strict=True):
        torch.testing.assert_close(a, b)


def _dora(parts_of: str, bias: bool = True, dropout: float = 0.0, size: tuple[int, int] = (12, 36)):
    from vpeft.methods.partial.dora import DoRALinear

    torch.manual_seed(0)
    base = nn.Linear(*size, bias=bias).double().requires_grad_(False)
    out = size[1]
    parts = output_parts(out, parts_of, True) if parts_of != "all" else [(0, out)]
    m = DoRALinear(base, 3, 2.0, dropout, parts, detach_norm=True)
    with torch.no_grad():
        m.lora_B.normal_()
        m.magnitude.mul_(torch.linspace(0.5, 2.0, m.magnitude.numel(), dtype=torch.float64))
    return m


@pytest.mark.parametrize("parts_of", ["qv", "k", "all"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("size", [(12, 36), (36, 12)], ids=["wider-out", "wider-in"])
def test_fused_dora_matches_autograd_through_the_weight(parts_of, bias, train_base, size):
    """The fused function's rank-r gradients (A, B, and the magnitude from the kept output)
    equal autograd's through ``W'`` (which forms the whole weight gradient); a layer wider in
    than out takes the rank-r features from the forward's product (a strided output)."""
    m = _dora(parts_of, bias, size=size)
    m.base.requires_grad_(train_base)  # composed with a method that trains W or c (BitFit)
    x = torch.randn(2, 5, size[0], dtype=torch.float64, requires_grad=True)

    def through_weight(t):
        return nn.functional.linear(t, m.adapted_weight(), m.base.bias)

    fused, plain = _grads(m, x, m), _grads(m, x, through_weight)
    assert len(fused) == 5 + train_base * (1 + bias)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["written-in-place", "zero-magnitude"])
def test_fused_dora_magnitude_gradient_without_a_usable_output(case):
    """The magnitude's gradient divides the kept output by ``m``: when the output was written
    in place after the forward, or a magnitude is 0, it is recomputed from the input instead."""
    m = _dora("qv")
    if case == "zero-magnitude":
        with torch.no_grad():
            m.magnitude[3] = 0.0
    x = torch.randn(7, 12, dtype=torch.float64)

    def written(t, fn):
        y = fn(t)
        return y.mul_(2.0) if case == "written-in-place" else y

    def through_weight(t):
        return nn.functional.linear(t, m.adapted_weight(), m.base.bias)

    fused = _grads(m, x, lambda t: written(t, m))
    plain = _grads(m, x, lambda t: written(t, through_weight).clone())
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
    assert fused[3].abs()[3] > 0  # the zero magnitude still gets a gradient


def test_dora_dropout_drops_the_low_rank_input_only():
    """With dropout the update runs on a dropped input (as LoRA's and Hugging Face PEFT's) and
    the magnitude scales the whole direction; evaluation uses the whole input."""
    m = _dora("qv", dropout=0.5)
    x = torch.randn(4, 12, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), nn.functional.linear(x, m.adapted_weight(), m.base.bias))
    m.train()
    torch.manual_seed(3)
    got = m(x)
    torch.manual_seed(3)
    xd = m.dropout(x)
    blocks = part_blocks(m.lora_B, m.parts, m.rank, 36)
    direction = m.base(x) - m.base.bias + m.scale * (xd @ m.lora_A.t()) @ blocks.t()
    assert not torch.allclose(got, m.eval()(x))
    ratio = torch.ones(36, dtype=torch.float64).index_put((m.rows,), m.magnitude
                                                          / m.direction_norm())
    torch.testing.assert_close(got, direction * ratio + m.base.bias)


@pytest.mark.parametrize("parts_of", ["all", "qv"])
def test_fused_lora_on_channels_last_maps_matches_plain_autograd(parts_of):
    """ConvNeXt's MLP: Linears on a permuted (B, H, W, C) map (a non-contiguous input), whose
    output gradient comes back permuted too; the output is written in place afterwards (an
    in-place activation), which the fused output, strided inside a wider product, must allow."""
    first = _lora(parts_of)
    torch.manual_seed(1)
    second = LoRALinear(nn.Linear(36, 12).double().requires_grad_(False), 2, 0.5, 0.0, [(0, 12)])
    with torch.no_grad():
        second.lora_B.normal_()

    gamma = torch.linspace(0.5, 2, 12, dtype=torch.float64)[:, None, None]

    def block(t, fc1, fc2):
        return fc2(torch.relu_(fc1(t.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2) * gamma

    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    both = nn.ModuleList([first, second])
    fused = _grads(both, x, lambda t: block(t, first, second))
    plain = _grads(both, x, lambda t: block(t, lambda s: _reference(first, s),
                                            lambda s: _reference(second, s)))
    assert len(fused) == 6  # output, A and B of both layers, x
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
