"""Counts read from the layers of the untouched tiny base model (``Dims.model``), by layer type.

For the specification methods (full, BitFit, LN-Tune, SSF, DiffFit, Partial-k) on families whose
closed form needs shapes no ``Dims`` field holds (a CNN's kernels, Swin's relative-position
tables and patch merging, EVA's SwiGLU MLP). Each function states the method's rule in terms of
layer types and names, independently of the method's code, and counts on the base model.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import vpeft

ROWS: list = []  # the counters only; rows live in the family modules
NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def _outside_head(m: nn.Module):
    view = vpeft.get_view(m)
    return [(n, p) for n, p in m.named_parameters() if not view.in_head(n)]


def backbone_count(m: nn.Module) -> int:
    """Every parameter outside the head (full fine-tuning)."""
    return sum(p.numel() for _, p in _outside_head(m))


def bias_count(m: nn.Module) -> int:
    """Every bias term outside the head (BitFit; EVA's and SwinV2's ``q_bias``/``v_bias`` too)."""
    return sum(p.numel() for n, p in _outside_head(m) if n.endswith("bias"))


def _norm_layers(m: nn.Module) -> list[nn.Module]:
    view = vpeft.get_view(m)
    return [x for n, x in m.named_modules() if isinstance(x, NORMS) and not view.in_head(n)]


def norm_affine_count(m: nn.Module) -> int:
    """Weight and bias of every normalisation layer outside the head (LN-Tune)."""
    return sum(p.numel() for x in _norm_layers(m) for p in x.parameters(recurse=False))


def ssf_count(m: nn.Module) -> int:
    """A scale and a shift per output channel after every Linear, conv with a bias, LayerNorm
    and BatchNorm outside the head (a conv without bias is left to the norm after it)."""
    view = vpeft.get_view(m)
    total = 0
    for n, x in m.named_modules():
        if view.in_head(n):
            continue
        if isinstance(x, nn.Linear):
            total += 2 * x.out_features
        elif isinstance(x, nn.MultiheadAttention):  # its packed q/k/v projection, unpacked
            total += 2 * 3 * x.embed_dim  # into a Linear by the view (open_clip)
        elif isinstance(x, nn.Conv2d) and x.bias is not None:
            total += 2 * x.out_channels
        elif isinstance(x, nn.LayerNorm):
            total += 2 * x.normalized_shape[-1]
        elif isinstance(x, _BatchNorm):
            total += 2 * x.num_features
    return total


def difffit_count(m: nn.Module, positions: int) -> int:
    """Biases, norm weights, and a per-channel gamma on ``positions`` branches of each block."""
    norm_weights = sum(x.weight.numel() for x in _norm_layers(m) if x.weight is not None)
    return bias_count(m) + norm_weights + positions * sum(vpeft.get_view(m).block_dims)


def partial_k_count(m: nn.Module) -> int:
    """The last block's parameters and those after it (the final norm), outside the head."""
    last = vpeft.get_view(m).blocks[-1] + "."
    names = [n for n, _ in _outside_head(m)]
    start = next(i for i, n in enumerate(names) if n.startswith(last))
    return sum(p.numel() for _, p in _outside_head(m)[start:])


def on_model(count):
    """A ``Row.count`` from a counter of the base model."""
    return lambda d: count(d.model)
