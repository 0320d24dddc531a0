"""Rows for pixel prompts, prefixes, query tokens and side networks (issue 5)."""

from rows import Dims, Row


def _frame(d: Dims, pad: int = 30) -> int:
    """visual-prompt: 30 px at 224 px, scaled with the side and kept under half of it."""
    return max(1, min(round(pad * d.img / 224), (d.img - 1) // 2))


def _visual_prompt(d: Dims) -> int:
    p = _frame(d)  # top + bottom (p x W) and left + right (H - 2p x p), per channel
    return 2 * d.C * p * d.img + 2 * d.C * p * (d.img - 2 * p)


def _prefix_reparam(d: Dims, p: int = 4, h: int = 16) -> int:
    # embedding E (P x D) + Linear(D, h) + Linear(h, L * 2 * D)
    return p * d.D + (d.D * h + h) + (h * d.L * 2 * d.D + d.L * 2 * d.D)


def _side_tune(d: Dims, w: int = 32) -> int:
    # conv(C -> w, patch x patch) + conv(w -> w, 3 x 3) + Linear(w, D); alpha is not learned
    return (d.C * w * d.patch**2 + w) + (9 * w * w + w) + (w * d.D + d.D)


def _lst(d: Dims, r: int = 8, layer: str = "block") -> int:
    s = d.D // r
    downs = (d.L + 1) * (d.D * s + s)  # ladders from the block-0 input and every block output
    # timm Block(s, qkv_bias): 2 norms, qkv, proj, fc1, fc2 = 12 s^2 + 13 s;
    # residual MLP: norm, fc1, fc2 = 8 s^2 + 7 s
    layers = d.L * (12 * s * s + 13 * s if layer == "block" else 8 * s * s + 7 * s)
    return downs + layers + d.L + 2 * s + (s * d.D + d.D)  # + gates, side norm, up-projection


ROWS = [
    Row("visual-prompt", _visual_prompt),
    Row("visual-prompt", _visual_prompt, {"init_std": 0.0}, zero_init=True),
    Row("prefix", lambda d: d.L * 2 * 10 * d.D),  # L x (keys + values) x P x D
    Row("prefix", _prefix_reparam, {"num_tokens": 4, "reparam_hidden": 16}),
    # VQT: only the query tokens (L x T x D). The re-created head, C x (D + L T D) + C, lives under
    # the head's path, so it is in `trainable` but not in `trainable_no_head`.
    Row("vqt", lambda d: d.L * 10 * d.D),
    Row("vqt", lambda d: d.L * 2 * d.D, {"num_tokens": 2, "pool": "mean"}),
    Row("vqt", lambda d: d.L * 3 * d.D, {"num_tokens": 3, "normalize": False}),
    Row("side-tune", _side_tune),
    Row("side-tune", lambda d: _side_tune(d, 8), {"width": 8, "alpha": 0.2, "curriculum": 4}),
    Row("lst", _lst),
    Row("lst", lambda d: _lst(d, 4, "mlp"), {"reduction": 4, "side_layer": "mlp"}),
]
