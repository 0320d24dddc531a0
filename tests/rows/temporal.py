"""Rows for the temporal (video) methods, AIM and ST-Adapter.

The matrix feeds images: each is a one-frame clip, so these rows check the characteristics that
do not need time (zero init, only the method's tensors train, counts, save/load, not mergeable).
``tests/test_video.py`` runs the same checks on clips, and what only clips can show.
"""

from rows import EVA, VIT, Dims, Row


def _bottleneck(d: int, h: int) -> int:
    return d * h + h + h * d + d  # down (with bias) + up (with bias)


def aim(d: Dims, ratio: float = 0.25, frames: int = 8, parts: int = 3) -> int:
    """``parts`` adapters of width ``ratio * D`` per block, plus a ``frames x D`` embedding."""
    return sum(parts * _bottleneck(w, int(w * ratio)) for w in d.widths) + frames * d.widths[0]


def st_adapter(d: Dims, width: int = 0, kernel: int = 3, blocks: int | None = None) -> int:
    """Per adapted block: down (D x w + w), depthwise conv (w x kernel + w), up (w x D + D)."""
    total = 0
    for w_d in d.widths[:blocks]:
        w = width or w_d // 2
        total += w_d * w + w + w * kernel + w + w * w_d + w_d
    return total


ROWS = [
    Row("aim", aim, backbones=VIT + EVA),
    Row("aim", lambda d: aim(d, 0.5, 0, 2), {"ratio": 0.5, "frames": 0,
                                             "parts": ("temporal", "joint")}),
    Row("aim", aim, {"embed_at": "input"}, backbones=("vit",)),  # the official code's placement
    Row("st-adapter", st_adapter, backbones=VIT + EVA),
    Row("st-adapter", lambda d: st_adapter(d, 4, 3, 1), {"width": 4, "blocks": (0,)}),
]
