"""Rows for the reference, first adapter, prompt, specification and reparameterization methods."""

from rows import Dims, Row


def _patch_embed(d: Dims) -> int:
    return d.D * d.C * d.patch * d.patch + (0 if d.norm_pre else d.D)  # no bias before norm_pre


def vit_block(d: Dims) -> int:
    """All parameters of one ViT block: qkv, proj, fc1, fc2 (weights and biases), two norms
    and, with layer scale, the two gammas."""
    qkv = 3 * d.D * d.D + (3 * d.D if d.qkv_bias else 0)
    ls = 2 * d.D if d.layer_scale else 0
    return qkv + (d.D * d.D + d.D) + 2 * d.D * d.H + d.H + d.D + 4 * d.D + ls


def _backbone(d: Dims) -> int:
    """All backbone parameters of a timm ViT (no head)."""
    tokens = d.prefix * d.D + (d.patches + d.prefix) * d.D  # prefix tokens + pos_embed
    return _patch_embed(d) + tokens + d.L * vit_block(d) + 2 * d.D * (d.ln_final + d.norm_pre)


def _block_biases(d: Dims) -> int:
    # per block: qkv (where it has one), proj, fc1, fc2, norm1, norm2
    return (3 * d.D if d.qkv_bias else 0) + d.D + d.H + d.D + 2 * d.D


def _biases(d: Dims) -> int:
    # blocks, patch embedding (without norm_pre), norm_pre, final norm
    return d.L * _block_biases(d) + d.D * (1 - d.norm_pre) + d.D * (d.ln_final + d.norm_pre)


def vit_norms(d: Dims) -> int:
    """Weights and biases of norm1/norm2 per block, norm_pre and the final norm (or fc_norm)."""
    return d.L * 4 * d.D + 2 * d.D * (d.ln_final + d.norm_pre)


def _ssf(d: Dims) -> int:
    # 2 x channels after: patch conv (if it has a bias), qkv, proj, fc1, fc2, norm1, norm2 (per
    # block), norm_pre, final norm
    per_block = 3 * d.D + d.D + d.H + d.D + 2 * d.D
    return 2 * (d.D * (1 - d.norm_pre) + d.L * per_block + d.D * (d.ln_final + d.norm_pre))


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
    Row("adapter", lambda d: d.L * 2 * (2 * d.D * 8 + 8 + d.D) + vit_norms(d)),
    Row("adapter", lambda d: d.L * (2 * d.D * 4 + 4 + d.D),
        {"dim": 4, "positions": ("mlp",), "train_norms": False}),
    Row("adaptformer", lambda d: d.L * (2 * d.D * 8 + 8 + d.D)),
    Row("adaptformer", lambda d: d.L * (2 * d.D * 64 + 64 + d.D), {"dim": 64, "input": "norm"}),
    Row("vpt-shallow", lambda d: 10 * d.D),
    Row("vpt-deep", lambda d: d.L * 5 * d.D, {"num_tokens": 5}),
]
