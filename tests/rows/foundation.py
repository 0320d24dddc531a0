"""Rows for the reference, first adapter, prompt, specification and reparameterization methods."""

from rows import Dims, Row


def _patch_embed(d: Dims) -> int:
    return d.D * d.C * d.patch * d.patch + d.D


def _backbone(d: Dims) -> int:
    """All backbone parameters of a timm ViT (no head)."""
    block = (3 * d.D * d.D + 3 * d.D) + (d.D * d.D + d.D) + 2 * d.D * d.H + d.H + d.D + 4 * d.D
    tokens = d.prefix * d.D + (d.patches + d.prefix) * d.D  # prefix tokens + pos_embed
    return _patch_embed(d) + tokens + d.L * block + 2 * d.D * d.ln_final


def _biases(d: Dims) -> int:
    # per block: qkv, proj, fc1, fc2, norm1, norm2; plus patch embedding and final norm
    return d.L * (3 * d.D + d.D + d.H + d.D + 2 * d.D) + d.D + d.D * d.ln_final


def _norms(d: Dims) -> int:
    """Weights and biases of norm1/norm2 per block and the final norm (or fc_norm)."""
    return d.L * 4 * d.D + 2 * d.D * d.ln_final


def _ssf(d: Dims) -> int:
    # 2 x channels after: patch conv, qkv, proj, fc1, fc2, norm1, norm2 (per block), final norm
    return 2 * (d.D + d.L * (3 * d.D + d.D + d.H + d.D + 2 * d.D) + d.D * d.ln_final)


ROWS = [
    Row("full", _backbone),
    Row("linear", lambda d: 0),
    Row("bitfit", _biases),
    Row("lora", lambda d: d.L * (8 * d.D + 3 * d.D * 8)),  # one pair on the fused qkv
    Row("lora", lambda d: d.L * 3 * (4 * d.D + d.D * 4), {"rank": 4, "qkv": "qkv"}),
    Row("lora", lambda d: d.L * 2 * (8 * d.D + d.D * 8), {"qkv": "qv"}),  # the paper's form
    Row(
        "lora",
        lambda d: d.L * ((2 * (2 * d.D + d.D * 2)) + (2 * d.D + d.H * 2)),
        {"rank": 2, "targets": ("qkv", "fc1")},
    ),
    Row("ssf", _ssf),
    Row("ssf", _ssf, {"init_std": 0.0}, zero_init=True),
    # Houlsby's default trains the norms too: 4 D per block (norm1, norm2) and the final norm
    Row("adapter", lambda d: d.L * 2 * (2 * d.D * 8 + 8 + d.D) + _norms(d)),
    Row("adapter", lambda d: d.L * (2 * d.D * 4 + 4 + d.D),
        {"dim": 4, "positions": ("mlp",), "train_norms": False}),
    Row("adaptformer", lambda d: d.L * (2 * d.D * 8 + 8 + d.D)),
    Row("adaptformer", lambda d: d.L * (2 * d.D * 64 + 64 + d.D), {"dim": 64, "input": "norm"}),
    Row("vpt-shallow", lambda d: 10 * d.D),
    Row("vpt-deep", lambda d: d.L * 5 * d.D, {"num_tokens": 5}),
]
