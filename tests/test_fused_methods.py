"""Memory-lean training paths of the reparameterizations (SSF, DoRA, FacT, GLoRA) compute
exactly what the plain autograd formulation computes: outputs and every gradient, in float64."""

from __future__ import annotations

import pytest
import torch
from tests.test_fused import _grads
from torch import nn

from vpeft.core.inject import ScaleShift
from vpeft.methods.partial.ssf import SSFScaleShift, _ScaleShiftFunction


def _ssf(base: nn.Module, channels: int, dim: int = -1, scale: float = 1.0) -> SSFScaleShift:
    torch.manual_seed(0)
    m = SSFScaleShift(base, channels, dim, init_std=0.3).double()
    with torch.no_grad():
        m.scale.mul_(scale)
        for p in base.parameters():
            p.normal_()  # LayerNorm starts at w = 1, b = 0: make the fold non-trivial
    base.requires_grad_(False)
    return m


@pytest.mark.parametrize("kind", ["linear", "layernorm", "conv", "small-scale"])
@pytest.mark.parametrize("train_base", [False, True])
def test_ssf_lean_path_matches_plain_autograd(kind, train_base):
    if kind == "conv":
        m, x = _ssf(nn.Conv2d(3, 6, 3), 6, dim=1), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    elif kind == "layernorm":
        m, x = _ssf(nn.LayerNorm(8), 8), torch.randn(2, 4, 8, dtype=torch.float64)
    else:  # a scale near zero: the backward keeps the input instead of dividing by the scale
        m = _ssf(nn.Linear(8, 6), 6, scale=1e-3 if kind == "small-scale" else 1.0)
        x = torch.randn(2, 4, 8, dtype=torch.float64)
    m.base.requires_grad_(train_base)
    x.requires_grad_(True)
    lean = _grads(m, x, m)
    plain = _grads(m, x, lambda t: ScaleShift.forward(m, t))
    assert len(lean) == 4 + 2 * train_base  # output, scale, shift, (base weight, bias), x
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_ssf_scaled_linear_matches_plain_autograd(bias):
    """A frozen Linear's SSF runs as one product with the scale folded into its weight rows."""
    from vpeft.methods.partial.ssf import _ScaledLinearFunction

    m = _ssf(nn.Linear(8, 6, bias=bias), 6)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    node = m(x).grad_fn.next_functions[0][0]  # under the reshape back to (2, 4, 6)
    assert type(node).__name__ == "_ScaledLinearFunctionBackward"  # the folded path ran
    lean = _grads(m, x, m)
    plain = _grads(m, x, lambda t: ScaleShift.forward(m, t))
    assert len(lean) == 4
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    w, c = m.base.weight, m.base.bias
    args = (x.detach()[0].requires_grad_(True), w, c, m.scale.detach().clone().requires_grad_(True),
            m.shift.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(_ScaledLinearFunction.apply, args)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_ssf_function_gradcheck(scale):
    y = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = (scale * (1 + 0.2 * torch.randn(5, dtype=torch.float64))).requires_grad_(True)
    t = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ScaleShiftFunction.apply, (y, s, t))


def test_ssf_lean_path_keeps_only_the_output():
    """The saved tensors of one SSF Linear are the scaled output (which the next op keeps too),
    the Linear's own saves and parameter-sized tensors: no second activation-sized tensor."""
    m = _ssf(nn.Linear(8, 6), 6).float()
    x = torch.randn(50, 8, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                  lambda t: t):
        m(x)
    assert sorted(sizes, reverse=True)[:2] == [300, 48]  # z (50 x 6), then the weight (6 x 8)


def _without_recompute(model: nn.Module) -> nn.Module:
    """The same model with the recomputation's bracketing hooks removed (plain autograd)."""
    from vpeft.core.recompute import Recomputer

    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for k in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None),
                                                             Recomputer)]:
            del hooks[k]
    return model


@pytest.mark.parametrize("method,options", [("fact-tt", {"dropout": 0.0}),
                                            ("fact-tk", {}), ("glora", {}), ("dora", {})])
def test_recomputed_norm_and_act_outputs_give_the_same_gradients(method, options):
    import copy

    from tests.conftest import tiny_model

    import vpeft
    from vpeft.core.recompute import Recomputer

    model = vpeft.adapt(tiny_model(), method, **options).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    plain = _without_recompute(copy.deepcopy(model))
    rec = next(fn.__self__ for fn in model._forward_pre_hooks.values()
               if isinstance(getattr(fn, "__self__", None), Recomputer))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, want = [], []
    for m, out in ((model, got), (plain, want)):
        torch.manual_seed(1)  # the same dropout masks
        m.train()
        m(x).logsumexp(-1).sum().backward()
        out += [p.grad for p in m.parameters() if p.requires_grad]
    assert rec.swapped > 0 and not rec.outputs  # something was recomputed; nothing left over
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bitwise: the same values, recomputed


def test_recompute_refuses_an_input_changed_in_place():
    from vpeft.core.recompute import recompute_norm_and_act_outputs

    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4))
    recompute_norm_and_act_outputs(net, [net])
    x = torch.randn(3, 6, requires_grad=True)
    h = x * 1
    out = net(h)
    with torch.no_grad():
        h.add_(1)  # changes the LayerNorm's input after the forward
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


@pytest.mark.parametrize("n_in,n_out", [(1, 3), (2, 1)])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_fact_function_matches_plain_autograd(n_in, n_out, dropout, train_base):
    """The fused FacT Linear (folded into W + dW without dropout) against the plain formula."""
    from vpeft.methods.partial.fact import _FacTFunction

    torch.manual_seed(0)
    d, r, n = 4, 3, 5
    kw = {"dtype": torch.float64, "requires_grad": True}
    x, u = torch.randn(n, n_in * d, **kw), torch.randn(r, d, **kw)
    cores, v = torch.randn(n_out, n_in, r, r, **kw), torch.randn(d, r, **kw)
    w = torch.randn(n_out * d, n_in * d, dtype=torch.float64, requires_grad=train_base)
    c = torch.randn(n_out * d, dtype=torch.float64, requires_grad=train_base)
    keep = torch.rand(n, n_out * r) > 0.3 if dropout else None

    def plain(x, u, cores, v, w, c):
        z = torch.einsum("nir,oiqr->noq", x.unflatten(-1, (-1, d)) @ u.t(), cores)
        if keep is not None:
            z = z * keep.view(n, n_out, r) / 0.7
        return x @ w.t() + c + 2.0 * (z @ v.t()).flatten(-2)

    def fused(x, u, cores, v, w, c):
        cmat = cores.permute(1, 3, 0, 2).reshape(n_in * r, n_out * r)
        return _FacTFunction.apply(x, w, c, u, cmat, v, keep, 0.3, 2.0)

    args = (x, u, cores, v, *((w, c) if train_base else ()))
    g = torch.randn(n, n_out * d, dtype=torch.float64)
    want = torch.autograd.grad(plain(x, u, cores, v, w, c), args, g)
    out = fused(x, u, cores, v, w, c)
    torch.testing.assert_close(out, plain(x, u, cores, v, w, c))
    for a, b in zip(torch.autograd.grad(out, args, g), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: fused(*a[:4], *(a[4:] or (w, c))), args)


@pytest.mark.parametrize("method", ["fact-tt", "fact-tk"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fact_layers_match_their_plain_update(method, dropout):
    """Every FacT Linear of a model, fused, gives the outputs and gradients of ``update``."""
    from tests.conftest import tiny_model

    import vpeft
    from vpeft.methods.partial.fact import FacTLinear

    model = vpeft.adapt(tiny_model(), method, dropout=dropout).double().train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    for m in (m for m in model.modules() if isinstance(m, FacTLinear)):
        x = torch.randn(3, 7, m.base.in_features, dtype=torch.float64, requires_grad=True)

        def plain(t, m=m):
            rows = t.reshape(-1, t.shape[-1])
            return m.update(rows, m.base(rows)).view(*t.shape[:-1], -1)

        torch.manual_seed(2)  # the same dropout masks (drawn in the same order, same shape)
        fused = _grads(m, x, m)
        torch.manual_seed(2)
        keep = torch.empty(21, m.codes.shape[0] * m.codes.shape[2]).bernoulli_(1 - dropout)
        if dropout:  # the plain path draws its mask through nn.Dropout: give it the same one
            m.dropout.forward = lambda z, k=keep: z * k.view(z.shape) / (1 - dropout)
        want = _grads(m, x, plain)
        for a, b in zip(fused, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fact_with_dropout_keeps_the_base_path_and_masks_only_the_update():
    from tests.conftest import tiny_model

    import vpeft

    model = vpeft.adapt(tiny_model(), "fact-tk", dropout=0.5).train()
    layer = next(m for m in model.modules() if type(m).__name__ == "FacTLinear")
    x = torch.randn(6, layer.base.in_features)
    with torch.no_grad():
        layer.factors.v.zero_()  # V = 0: the update vanishes, whatever the mask
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_repadapter_fused_matches_the_adapter_as_written(dropout, bias):
    """RepAdapter's fused function (folded into the Linear without dropout) gives the outputs and
    gradients of ``base(x + s (B drop(A x + a) + b))``."""
    from vpeft.methods.partial.repadapter import RepAdaptedLinear

    torch.manual_seed(0)
    base = nn.Linear(8, 12, bias=bias).double().requires_grad_(False)
    m = RepAdaptedLinear(base, hidden=4, groups=2, scale=1.5, dropout=dropout).double().train()
    with torch.no_grad():
        for p in (m.up, m.up_bias, m.down_bias):
            p.normal_()  # B and the biases start at zero: make every gradient non-trivial
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    node = m(x).grad_fn.next_functions[0][0]
    assert type(node).__name__ == "_RepAdapterFunctionBackward"
    torch.manual_seed(2)
    fused = _grads(m, x, m)
    torch.manual_seed(2)  # the same mask, given to the plain path's dropout
    keep = torch.empty(15, 4).bernoulli_(1 - dropout)
    if dropout:
        m.dropout.forward = lambda h: h * keep.view(h.shape) / (1 - dropout)
    want = _grads(m, x, m.adapted)
    assert len(fused) == 6  # output, A, a, B, b, x
    for a, b in zip(fused, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
