"""Rows for the dense-prediction adapters of issue 13: Mona and E3VA, on ViTs, Swin and ConvNeXt
Counts use the per-block widths; ConvNeXt and CNN blocks have no attention,
so one position per block there."""

from rows import CONVNEXT, VIT, Dims, Row


def _positions(d: Dims) -> int:
    return 1 if d.family == "convnext" else 2  # no attention: the block output only


def _mona(d: Dims, m: int = 64) -> int:
    # LayerNorm 2w + scales s1, s2 2w + down (w m + m) + up (m w + w)
    # + depthwise 3/5/7 convs m (9 + 25 + 49) + 3 m + 1 x 1 projector m^2 + m
    per = sum(5 * w + 2 * w * m + m * m + 88 * m for w in d.widths)
    return _positions(d) * per


def _e3va(d: Dims, r: int = 8) -> int:
    return _positions(d) * sum(2 * w * r + r + w for w in d.widths)  # a bottleneck per position


ROWS = [
    # SwinV2 (res-post-norm) runs too (tests/test_backbones.py), with mona1 placed differently
    Row("mona", _mona, backbones=(*VIT, "swin", *CONVNEXT)),
    Row("mona", lambda d: _mona(d, 8), {"dim": 8, "zero_up": True}, backbones=("vit",)),
    Row("e3va", _e3va, backbones=("vit", "vit-avgpool-reg", "swin", "swinv2", *CONVNEXT)),
    Row("e3va", lambda d: _e3va(d, 4) // 2, {"rank": 4, "positions": ("attn",)},
        backbones=("swin",)),
]
