"""Rows for the ``hf:<tuner>`` methods (Hugging Face PEFT's tuners), where ``peft`` is installed.

Their default targets are every Linear inside the blocks (every block conv on a CNN), so the
counts sum a per-layer formula over those layers of the untouched tiny base (``Dims.model``),
read through its view: the shapes come from the architecture, never from the adapted model.
"""

from __future__ import annotations

import math

from torch import nn

from rows import EVA, SWIN, VIT, Dims, Row

ROWS: list[Row] = []


def _linears(d: Dims) -> list[tuple[int, int]]:
    """(out, in) of every Linear inside the blocks that reads or writes the block's width."""
    import vpeft

    view = vpeft.get_view(d.model)
    return [(m.out_features, m.in_features) for b, w in zip(view.blocks, view.block_dims)
            for m in d.model.get_submodule(b).modules()
            if isinstance(m, nn.Linear) and w in (m.in_features, m.out_features)]


def _convs(d: Dims) -> list[nn.Conv2d]:
    """Every non-grouped conv inside the blocks."""
    import vpeft

    convs = (d.model.get_submodule(c) for c in vpeft.get_view(d.model).convs)
    return [c for c in convs if c.groups == 1]


def _per_linear(f):
    return lambda d: sum(f(out, inp) for out, inp in _linears(d))


def _lokr(out: int, inp: int, r: int = 8) -> int:
    # PEFT's LoKr: out = u_o * v_o and in = u_i * v_i (factors near sqrt); w1 full (u_o x u_i),
    # w2 low-rank (v_o x r, r x v_i) unless r >= max(v_o, v_i) / 2 (then full v_o x v_i)
    from peft.tuners.lokr.layer import factorization

    (uo, vo), (ui, vi) = factorization(out, -1), factorization(inp, -1)
    w2 = vo * vi if r >= max(vo, vi) / 2 else r * (vo + vi)
    return uo * ui + w2


def _ia3(d: Dims) -> int:
    # a scale per output of every Linear, per input of each MLP's last Linear (fc2)
    layers = _linears(d)
    per_block = len(layers) // d.L
    return sum(inp if (i + 1) % per_block == 0 else out for i, (out, inp) in enumerate(layers))


def _lora_convs(d: Dims, r: int) -> int:
    # A: r x in x k x k, B: out x r (1 x 1)
    return sum(r * (c.in_channels * math.prod(c.kernel_size) + c.out_channels) for c in _convs(d))


try:
    import peft  # noqa: F401
except ImportError:  # optional: without it the hf: methods are not listed with a row either
    pass
else:
    ROWS += [
        Row("hf:lora", _per_linear(lambda o, i: 4 * (o + i)), {"r": 4},
            backbones=(VIT[0], SWIN[0], EVA[0])),
        Row("hf:lora", lambda d: _lora_convs(d, 2), {"r": 2}, backbones=("resnet",)),
        # DoRA: LoRA plus a magnitude per output row
        Row("hf:lora", _per_linear(lambda o, i: 2 * (o + i) + o), {"r": 2, "use_dora": True},
            backbones=(VIT[0],)),
        Row("hf:loha", _per_linear(lambda o, i: 2 * 4 * (o + i)), {"r": 4},
            backbones=(VIT[0],)),
        Row("hf:lokr", _per_linear(_lokr), backbones=(VIT[0],)),
        # block-diagonal rotation of the input: in / b blocks of b (b - 1) / 2 free entries
        Row("hf:oft", _per_linear(lambda o, i: i * 15 // 2), {"oft_block_size": 16},
            backbones=(VIT[0],)),
        # butterfly factor 1 of b x b blocks on the input, plus a scale per output
        Row("hf:boft", _per_linear(lambda o, i: i * 4 + o), backbones=(VIT[0],)),
        Row("hf:ia3", _ia3, backbones=(VIT[0], SWIN[0])),
        # frozen shared random projections (rank 16): trainable scales d (r) and b (out)
        Row("hf:vera", _per_linear(lambda o, i: 16 + o), {"r": 16}, backbones=(VIT[0],)),
        # n spectral coefficients per layer
        Row("hf:fourierft", _per_linear(lambda o, i: 100), {"n_frequency": 100},
            backbones=(VIT[0],)),
        # r Householder vectors of the input width
        Row("hf:hra", _per_linear(lambda o, i: 4 * i), {"r": 4}, backbones=(VIT[0],)),
    ]
