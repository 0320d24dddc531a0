"""Rows for issue 4: Convpass, RepAdapter, LN-Tune, Partial-k, DiffFit, DoRA, FacT, KAdaptation."""

from rows import Dims, Row
from rows.foundation import _biases, vit_block, vit_norms


def _convpass(d: Dims, c: int = 8, positions: int = 2) -> int:
    # down D->c (+bias), 3x3 conv c->c (+bias), up c->D (+bias), beside each position
    return d.L * positions * ((d.D * c + c) + (9 * c * c + c) + (c * d.D + d.D))


def _repadapter(d: Dims, h: int = 8, g: int = 2, positions: int = 2) -> int:
    # A: D->h (+bias); B: g groups of (h/g -> D/g) (+bias D), before each position
    return d.L * positions * ((d.D * h + h) + (d.D * (h // g) + d.D))


def _difffit(d: Dims, per_channel: bool = True) -> int:
    ln_weights = d.L * 2 * d.D + d.D * (d.ln_final + d.norm_pre)
    gammas = d.L * 2 * (d.D if per_channel else 1)
    return _biases(d) + ln_weights + gammas


def _slices(d: Dims) -> int:
    """D x D slices FacT stacks per model: q, k, v, o and H/D each for fc1 and fc2 per block."""
    return d.L * (4 + 2 * d.H // d.D)


def _fact_tt(d: Dims, r: int) -> int:
    return 2 * d.D * r + _slices(d) * r * r  # U, V shared; an r x r core per slice


def _fact_tk(d: Dims, r: int) -> int:
    return 2 * d.D * r + r**3 + _slices(d) * r  # U, V, core C shared; an r-code per slice


def _kadaptation(d: Dims, n: int, parts: int = 2, bias: bool = True) -> int:
    fast = parts * n * 2 * (d.D // n)  # u_i (D/n x 1) and v_i (1 x D/n) per product and part
    slow = parts * n * 2 * n  # rank-1 factors of n slow n x n matrices per kind (q, v)
    return d.L * (fast + (d.D if bias else 0)) + slow


ROWS = [
    Row("convpass", _convpass),
    Row("convpass", lambda d: _convpass(d, c=4, positions=1),
        {"dim": 4, "positions": ("mlp",), "conv_init": "xavier", "act": "gelu"}),
    Row("repadapter", _repadapter),
    Row("repadapter", lambda d: _repadapter(d, h=4, g=4, positions=1),
        {"dim": 4, "groups": 4, "positions": ("attn",), "scale": 10.0}),
    Row("ln-tune", vit_norms),
    Row("partial-k", lambda d: vit_block(d) + 2 * d.D * d.ln_final),
    Row("partial-k", lambda d: 2 * vit_block(d), {"k": 2, "tail": False}),
    Row("difffit", _difffit),
    Row("difffit", lambda d: _difffit(d, per_channel=False), {"per_channel": False}),
    Row("dora", lambda d: d.L * (2 * (8 * d.D + d.D * 8) + 2 * d.D)),
    Row("dora", lambda d: d.L * (3 * (4 * d.D + d.D * 4) + 3 * d.D + (4 * d.D + d.H * 4) + d.H),
        {"rank": 4, "qkv": "qkv", "targets": ("qkv", "fc1"), "detach_norm": False}),
    Row("fact-tt", lambda d: _fact_tt(d, 8)),
    Row("fact-tt", lambda d: 2 * d.D * 4 + d.L * 4 * 4 * 4, {"rank": 4, "mlp": False}),  # q,k,v,o
    Row("fact-tk", lambda d: _fact_tk(d, 32)),
    Row("fact-tk", lambda d: _fact_tk(d, 4), {"rank": 4, "scale": 1.0, "dropout": 0.0}),
    Row("kadaptation", lambda d: _kadaptation(d, 4), {"n": 4}),
    Row("kadaptation", lambda d: _kadaptation(d, 8, parts=3, bias=False),
        {"n": 8, "qkv": "qkv", "bias": False, "scale": 1.0}),
]
