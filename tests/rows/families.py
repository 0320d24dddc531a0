"""Rows on backbone families other than the plain ViT: ViT variants, EVA, Swin, ConvNeXt, CNNs.

Counts of methods that add modules use the per-block widths (``Dims.widths``, ``Dims.hiddens``)
and the family's block layout (:func:`block_linears`), so one formula serves fixed-width and
hierarchical models; the specification methods count by layer type on the base model
(``rows.layers``). See the package docstring for the mechanism.
"""

from dataclasses import replace

from rows import CONVNEXT, EVA, SWIN, VIT_LS_PRENORM, VIT_NOBIAS, Dims, Row
from rows.cnn import CNN_KINDS
from rows.foundation import ROWS as FOUNDATION_ROWS
from rows.issue4 import ROWS as ISSUE4_ROWS
from rows.issue5 import ROWS as ISSUE5_ROWS
from rows.layers import (
    backbone_count,
    bias_count,
    difffit_count,
    norm_affine_count,
    on_model,
    partial_k_count,
    ssf_count,
)
from rows.unified import ROWS as UNIFIED_ROWS
from rows.unified import _glora_layer

VIT_ROWS = FOUNDATION_ROWS + ISSUE4_ROWS + ISSUE5_ROWS + UNIFIED_ROWS
# methods whose merge folds into qkv: on a bias-less qkv they must not invent a bias (or say so)
_FOLD_INTO_QKV = {"lora", "dora", "ssf", "repadapter", "glora", "kadaptation", "fact-tt"}
# each method's first (default) ViT row, run on the ViT variants too
_FIRST = list({r.method: r for r in reversed(VIT_ROWS)}.values())[::-1]


def _per_block(f):
    return lambda d: sum(f(w, h) for w, h in zip(d.widths, d.hiddens))


def block_linears(d: Dims, w: int, h: int) -> list[tuple[int, int]]:
    """``(out, in)`` of a block's attention projections and MLP Linears, by family.

    EVA's SwiGLU ``fc1`` packs gate and value (``h`` = 2 x the hidden width ``fc2`` reads);
    ConvNeXt has no attention; separate q/k/v projections are three ``w x w`` Linears.
    """
    mlp = [(h, w), (w, h // 2 if d.family == "eva" else h)]
    if d.family == "convnext":
        return mlp
    qkv = [(3 * w, w)] if d.qkv_fused else [(w, w)] * 3
    return [*qkv, (w, w), *mlp]


def _qv_updates(d: Dims, w: int, h: int) -> list[tuple[int, int]]:
    """``(out, in)`` of each update LoRA-style methods make by default in a block: q and v
    (rows of a fused qkv or separate projections); ConvNeXt's fc1 and fc2."""
    if d.family == "convnext":
        return [(h, w), (w, h)]
    return [(w, w), (w, w)]


def _lora(rank: int, dora: bool = False):
    """One pair per update (a fused qkv's single pair over q, k, v has the same count as two
    q/v pairs: r w + 3 w r = 2 (r w + w r)); DoRA adds a magnitude per adapted row."""
    return lambda d: sum(rank * i + o * rank + (o if dora else 0)
                         for w, h in zip(d.widths, d.hiddens) for o, i in _qv_updates(d, w, h))


def _lora_qkv(rank: int):  # the same count fused (3 parts) or separate (q, k, v)
    return _per_block(lambda w, h: 3 * (rank * w + w * rank))


def _glora(d: Dims) -> int:
    return sum(_glora_layer(o, i) for w, h in zip(d.widths, d.hiddens)
               for o, i in block_linears(d, w, h))


def _slices(d: Dims) -> dict[int, int]:
    """Width -> how many w x w slices (the last of a row or column partial) its blocks have."""
    out: dict[int, int] = {}
    for w, h in zip(d.widths, d.hiddens):
        n = sum(-(-o // w) * -(-i // w) for o, i in block_linears(d, w, h))
        out[w] = out.get(w, 0) + n
    return out


def _fact(rank: int, tucker: bool):
    """One U, V (and Tucker core) per width; an r x r core (TT) or an r-code (TK) per slice."""
    return lambda d: sum(2 * w * rank + (rank**3 + s * rank if tucker else s * rank * rank)
                         for w, s in _slices(d).items())


def _kadaptation(n: int):
    """Per update: fast factors (out + in), a bias on the update (shared by q and v of a fused
    layer); two kinds of slow matrices (q, v or fc1, fc2) of 2 n^2 each."""
    def count(d: Dims) -> int:
        total = 0
        for w, h in zip(d.widths, d.hiddens):
            ups = _qv_updates(d, w, h)
            total += sum(o + i for o, i in ups)
            total += w if d.family != "convnext" and d.qkv_fused else sum(o for o, _ in ups)
        return total + 2 * 2 * n * n
    return count


def _positions(d: Dims) -> int:
    return 1 if d.family == "convnext" else 2  # ConvNeXt: the MLP only


def _repadapter(d: Dims, h: int = 8, g: int = 2) -> int:
    return _positions(d) * sum((w * h + h) + (w * (h // g) + w) for w in d.widths)


def _adapter(d: Dims, dim: int = 8) -> int:  # Houlsby's default trains the norms too
    return _positions(d) * sum(2 * w * dim + dim + w for w in d.widths) + norm_affine_count(
        d.model)


def _visual_prompt(d: Dims) -> int:  # pixels: the same on every family
    return next(r for r in ISSUE5_ROWS if r.method == "visual-prompt").count(d)


try:
    from conftest import TINY
except ImportError:  # imported outside the test session
    TINY = {}

# Hugging Face transformers models and an open_clip tower, where their packages are installed
HF = tuple(k for k in ("hf-vit", "hf-dinov2", "hf-clip", "hf-swin") if k in TINY)
OPEN_CLIP = tuple(k for k in ("open-clip",) if k in TINY)
ATTENTION = EVA + SWIN
NOT_VIT = ATTENTION + CONVNEXT
TOWERS = HF + OPEN_CLIP
# methods whose ViT formula holds on EVA as written (D is EVA's width, tokens as on a ViT)
_AS_ON_VIT = {"adaptformer", "convpass", "vpt-shallow", "vpt-deep", "lst", "side-tune", "noah"}

ROWS = [
    replace(r, backbones=VIT_NOBIAS) for r in VIT_ROWS if r.method in _FOLD_INTO_QKV
] + [
    replace(r, backbones=VIT_NOBIAS) for r in _FIRST if r.method not in _FOLD_INTO_QKV
] + [
    replace(r, backbones=VIT_LS_PRENORM) for r in _FIRST
] + [
    # NOAH's LoRA needs a fused qkv
    replace(r, backbones=("eva",) if r.method == "noah" else EVA)
    for r in _FIRST if r.method in _AS_ON_VIT - {"adaptformer"}
] + [
    Row(r.method, r.count, r.options, r.zero_init, TOWERS)
    for r in [
        Row("linear", lambda d: 0),
        Row("full", on_model(backbone_count)),
        Row("bitfit", on_model(bias_count)),
        Row("ln-tune", on_model(norm_affine_count)),
        Row("ssf", on_model(ssf_count)),
        Row("partial-k", on_model(partial_k_count)),
        Row("visual-prompt", _visual_prompt),
        Row("lora", _lora(8)),
        Row("dora", _lora(8, dora=True)),
        Row("kadaptation", _kadaptation(4), {"n": 4}),
        Row("fact-tt", _fact(8, tucker=False)),
        Row("adapter", _adapter),
        Row("adaptformer", _per_block(lambda w, h: 2 * w * 8 + 8 + w)),
    ]
] + [
    Row("repadapter", _repadapter, backbones=OPEN_CLIP),  # a fused qkv (HF: separate)
    # open_clip: merging leaves the view's unpacked attention inside DiffFit's wrapper (open)
    Row("difffit", lambda d: difffit_count(d.model, 2), backbones=HF),
    Row("linear", lambda d: 0, backbones=NOT_VIT),
    Row("full", on_model(backbone_count), backbones=NOT_VIT),
    Row("bitfit", on_model(bias_count), backbones=NOT_VIT),
    Row("ln-tune", on_model(norm_affine_count), backbones=NOT_VIT),
    Row("ssf", on_model(ssf_count), backbones=NOT_VIT),
    Row("difffit", lambda d: difffit_count(d.model, _positions(d)), backbones=NOT_VIT),
    Row("partial-k", on_model(partial_k_count), backbones=NOT_VIT),
    Row("visual-prompt", _visual_prompt, backbones=NOT_VIT + CNN_KINDS),
    Row("lora", _lora(8), backbones=NOT_VIT),  # q and v (ConvNeXt: fc1 and fc2) of every block
    Row("lora", _lora_qkv(4), {"rank": 4, "qkv": "qkv"}, backbones=ATTENTION),
    Row("dora", _lora(8, dora=True), backbones=NOT_VIT),
    Row("kadaptation", _kadaptation(4), {"n": 4}, backbones=NOT_VIT),
    Row("glora", _glora, {"D": "none"}, backbones=NOT_VIT),
    Row("fact-tt", _fact(8, tucker=False), backbones=NOT_VIT),
    Row("fact-tk", _fact(32, tucker=True), backbones=NOT_VIT),
    Row("repadapter", _repadapter, backbones=("eva", *SWIN, *CONVNEXT)),  # fused qkv
    Row("adapter", _adapter, backbones=NOT_VIT),
    Row("adapter", _per_block(lambda w, h: 2 * (2 * w * 8 + 8 + w)), {"train_norms": False},
        backbones=ATTENTION),
    Row("adaptformer", _per_block(lambda w, h: 2 * w * 8 + 8 + w), backbones=NOT_VIT),
]
