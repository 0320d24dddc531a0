"""Rows on backbone families other than the plain ViT: a bias-less ViT, EVA, Swin, ConvNeXt.

Counts use the per-block widths (``Dims.widths``, ``Dims.hiddens``), so one formula serves
fixed-width and hierarchical models; see the package docstring for the mechanism.
"""

from dataclasses import replace

from rows import CONVNEXT, EVA, SWIN, VIT_NOBIAS, Dims, Row
from rows.foundation import ROWS as FOUNDATION_ROWS
from rows.foundation import _biases
from rows.issue4 import ROWS as ISSUE4_ROWS
from rows.issue5 import ROWS as ISSUE5_ROWS
from rows.unified import ROWS as UNIFIED_ROWS
from rows.unified import _glora_layer

# methods whose merge folds into qkv: on a bias-less qkv they must not invent a bias (or say so)
_FOLD_INTO_QKV = {"lora", "dora", "ssf", "repadapter", "glora", "kadaptation", "fact-tt"}


def _per_block(f) -> "callable":
    return lambda d: sum(f(w, h) for w, h in zip(d.widths, d.hiddens))


def _lora(rank: int, parts: int):
    return _per_block(lambda w, h: parts * (rank * w + w * rank))


def _glora(d: Dims) -> int:
    return sum(_glora_layer(3 * w, w) + _glora_layer(w, w) + _glora_layer(h, w)
               + _glora_layer(w, h) for w, h in zip(d.widths, d.hiddens))


ROWS = [
    replace(r, backbones=VIT_NOBIAS)
    for r in FOUNDATION_ROWS + ISSUE4_ROWS + ISSUE5_ROWS + UNIFIED_ROWS
    if r.method in _FOLD_INTO_QKV
] + [
    Row("bitfit", lambda d: _biases(d) - d.L * 3 * d.D, backbones=VIT_NOBIAS),  # no qkv bias
    Row("linear", lambda d: 0, backbones=EVA + SWIN + CONVNEXT),
    Row("lora", _lora(8, 2), backbones=EVA + SWIN),  # q and v of every block
    Row("lora", _lora(4, 3), {"rank": 4, "qkv": "qkv"}, backbones=EVA + SWIN),
    Row("dora", lambda d: _lora(8, 2)(d) + sum(2 * w for w in d.widths), backbones=EVA + SWIN),
    Row("adapter", _per_block(lambda w, h: 2 * (2 * w * 8 + 8 + w)), {"train_norms": False},
        backbones=EVA + SWIN),
    Row("adaptformer", _per_block(lambda w, h: 2 * w * 8 + 8 + w),
        backbones=EVA + SWIN + CONVNEXT),
    Row("glora", _glora, {"D": "none"}, backbones=SWIN),
]
