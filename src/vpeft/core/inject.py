"""The injection primitives every method is built from, each a :class:`Wrapper`.

* :class:`LinearUpdate`: a leaf Linear whose output gets a learned update (LoRA, FacT, ...).
* :class:`Bypass`: a sub-module (``block.mlp``, ``block.attn``) with a learned branch added
  after it (sequential adapter) or beside it (parallel adapter).
* :class:`ScaleShift`: a leaf module followed by a per-channel affine map (SSF).
* :class:`Bottleneck`: the down-project / activation / up-project module adapters share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.surgery import NotMergeableError, Wrapper
from vpeft.core.targeting import find_modules


def activation(name: str) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation '{name}'; choose from {sorted(acts)}")
    return acts[name]()


class Bottleneck(nn.Module):
    """``up(dropout(act(down(x))))``; ``up`` starts at zero, so the branch starts as zero."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str = "gelu",
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(hidden, out_dim or dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class Bypass(Wrapper):
    """``y = base(x); y + s * branch(y)`` (sequential) or ``y + s * branch(x)`` (parallel)."""

    def __init__(
        self,
        base: nn.Module,
        branch: nn.Module,
        parallel: bool,
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__(base)
        self.branch = branch
        self.parallel = parallel
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.scale = scale

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))  # HF CLIP passes hidden_states=
        if isinstance(y, tuple):  # an attention returning (output, weights ...): HF, open_clip
            out = y[0]
            return (out + self.scale * self.branch(x if self.parallel else out), *y[1:])
        return y + self.scale * self.branch(x if self.parallel else y)


class LinearUpdate(Wrapper):
    """A Linear layer plus a learned update of its output; subclasses give the update.

    ``update(x)`` is what gets added to ``base(x)``; ``delta_weight()`` is the equivalent change of
    ``base.weight`` (same shape), used by ``fold``/``unfold``; ``delta_bias()`` a bias change.
    """

    base: nn.Linear

    #: Run as ``F.linear(x, W + delta_weight(), c + delta_bias())`` instead of ``base(x)`` plus
    #: ``update``: the faster way for an update that is dense on the activations but cheap to
    #: build as a weight (its cost is one weight gradient of the layer in the backward).
    through_weight: bool = False

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def fold_adds_bias(self) -> bool:
        return self.base.bias is None and self.delta_bias() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.through_weight:
            bias, db = self.base.bias, self.delta_bias()
            if db is not None:
                bias = db if bias is None else bias + db
            return F.linear(x, self.base.weight + self.delta_weight(), bias)
        # on (N, in) rows the Linear's output is a fresh tensor, not a view of one, so updates may
        # write into it in place without autograd re-basing a view (a copy of the whole output)
        rows = x.reshape(-1, x.shape[-1])
        return self.update(rows, self.base(rows)).view(*x.shape[:-1], -1)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        db = self.delta_bias()
        if db is not None:
            _bias_of(self.base).add_(db)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        db = self.delta_bias()
        if db is not None:
            self.base.bias -= db


def _bias_of(module: nn.Module) -> torch.Tensor:
    """The module's bias, created (as zeros) if it had none, so an update can fold into it."""
    if module.bias is None:
        out = module.weight.shape[0]
        module.bias = nn.Parameter(module.weight.new_zeros(out), requires_grad=False)
    return module.bias


class ScaleShift(Wrapper):
    """``base(x) * scale + shift`` per output channel (last dim; dim 1 for convolutions)."""

    def __init__(
        self, base: nn.Module, channels: int, channel_dim: int = -1, init_std: float = 0.0
    ) -> None:
        super().__init__(base)
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, std=init_std)

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return t
        return t.view(-1, *([1] * (ndim - 2)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        return y * self._shape(self.scale, y.ndim) + self._shape(self.shift, y.ndim)

    def fold_adds_bias(self) -> bool:
        return getattr(self.base, "bias", None) is None

    def _weight_view(self, w: torch.Tensor) -> torch.Tensor:
        # LayerNorm weights are 1-D; Linear (out, in); Conv (out, in, kh, kw)
        return self.scale.view(-1, *([1] * (w.ndim - 1)))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        if getattr(self.base, "weight", None) is None:
            raise NotMergeableError(
                f"cannot fold a scale into {type(self.base).__name__}: no weight"
            )
        w = self.base.weight
        w.mul_(self._weight_view(w))
        bias = _bias_of(self.base)
        bias.mul_(self.scale).add_(self.shift)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        self.base.bias.sub_(self.shift).div_(self.scale)
        w = self.base.weight
        w.div_(self._weight_view(w))


class _AddToSlices(torch.autograd.Function):
    """``y[..., s:e] += delta`` for each part, in place, with a backward that only hands out views.

    Autograd's own slice assignment (``CopySlices``) clones the whole output gradient and
    scatters it back for every part; here the gradient of ``y`` is the incoming one, unchanged,
    and each delta's gradient is a view of its columns, so the backward copies nothing.
    """

    @staticmethod
    def forward(ctx, y, parts, *deltas):  # type: ignore[override]
        for (s, e), d in zip(parts, deltas, strict=True):
            y[..., s:e] += d
        ctx.mark_dirty(y)
        ctx.parts = parts
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, *(grad[..., s:e] for s, e in ctx.parts)


def add_to_slices(
    y: torch.Tensor, parts: list[tuple[int, int]], deltas: list[torch.Tensor]
) -> torch.Tensor:
    """Add ``deltas[i]`` to the last-dim columns ``parts[i]`` of ``y`` in place; returns ``y``.

    ``y`` must not be needed by the backward of whatever produced it (true of a Linear's output);
    autograd checks this and raises if it is. The cheap way for a method to update some output
    rows of a fused layer (q and v of ``qkv``) without copying gradients.
    """
    return _AddToSlices.apply(y, parts, *deltas)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on ``x``'s device run in: autocast's, else ``x``'s own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _NarrowLinear(torch.autograd.Function):
    """``x @ w.T`` for a weight with few input columns (a rank-r up-projection).

    The weight's gradient is computed as ``(x^T g)^T``: on CPU BLAS, ``g^T x`` with a narrow
    ``x`` (r = 8) is several times slower than the same product in this orientation.
    """

    @staticmethod
    def forward(ctx, x, w):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = g @ w if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (x.reshape(-1, x.shape[-1]).t() @ g.reshape(-1, g.shape[-1])).t()
        return gx, gw


def narrow_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) with a backward suited to a narrow ``w`` (out x r, small r)."""
    dt = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _NarrowLinear.apply(x.to(dt), w.to(dt))


def lowrank_(a: torch.Tensor) -> None:
    """LoRA's initialisation of a down-projection (Kaiming-uniform, as nn.Linear)."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


__all__ = [
    "Bottleneck",
    "Bypass",
    "LinearUpdate",
    "ScaleShift",
    "activation",
    "add_to_slices",
    "compute_dtype",
    "lowrank_",
    "narrow_linear",
    "share",
]


def share(users: list[nn.Module], name: str, shared: nn.Module) -> None:
    """Give every module in ``users`` the attribute ``name`` -> ``shared`` (factors that several
    layers use, as in FacT or KAdaptation).

    Only the first user registers it, so its parameters are saved, counted, moved and optimised
    once (safetensors also refuses tensors stored twice); the others hold a plain reference,
    which ``copy.deepcopy`` of the whole model keeps pointing at the one copy.
    """
    for i, user in enumerate(users):
        if i == 0:
            user.add_module(name, shared)
        else:
            object.__setattr__(user, name, shared)


def output_parts(out_features: int, which: str, fused_qkv: bool) -> list[tuple[int, int]]:
    """Output row ranges to adapt: slices of q/k/v on a fused layer, else (or with ``which`` =
    ``'fused'``: one update over the whole layer) all rows."""
    if not fused_qkv or which == "fused":
        return [(0, out_features)]
    d = out_features // 3
    return [("qkv".index(c) * d, ("qkv".index(c) + 1) * d) for c in "qkv" if c in which]


def linear_targets(
    model: nn.Module, view: BackboneView, targets: tuple[str, ...], which: str, method: str
) -> list[tuple[str, list[tuple[int, int]]]]:
    """The Linear layers that ``targets`` select outside the heads, each with its output rows.

    The pattern ``"qkv"`` means the attention's projections as the view knows them: the fused
    layer (only the rows of the parts in ``which``, e.g. ``"qv"``), or, where the family has
    separate projections, the q/k/v Linears named by ``which`` (all their rows). A family with
    blocks but no attention projections raises :class:`MissingPartError` for it.
    """
    patterns, separate = tuple(targets), set()
    if "qkv" in patterns and not view.qkv and view.blocks:
        if not view.qkv_separate:
            view.require("qkv", method=method)
        patterns = tuple(t for t in patterns if t != "qkv")
        # no fused layer to share one pair over: 'fused' falls back to the paper's q and v
        separate = view.separate_qkv_paths("qv" if which == "fused" else which)
    found = set(find_modules(model, patterns, nn.Linear)) if patterns else set()
    fused = view.fused_qkv_paths()
    return [
        (path, output_parts(module.out_features, which, path in fused))
        for path, module in model.named_modules()
        if (path in found or path in separate) and not view.in_head(path)
    ]
