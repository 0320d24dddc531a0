"""Rows for the unified methods: NOAH and GLoRA (subnets and supernets)."""

from rows import Dims, Row


def _noah(d: Dims, adapter: list[int], lora: list[int], prompt: list[int]) -> int:
    # adapter after the MLP: D -> a -> D with biases; LoRA on qkv: A (r x D) + B (3D x r); prompts
    return sum((2 * d.D * a + a + d.D if a else 0) + r * 4 * d.D + n * d.D
               for a, r, n in zip(adapter, lora, prompt))


def _glora_layer(out: int, inp: int) -> int:
    # A, B lora4 (4 (out + in) each); C vector (in); E vector (out); D none (see ROWS)
    return 8 * (out + inp) + inp + out


def _linears(d: Dims) -> list[tuple[int, int]]:
    """(out, in) of every Linear GLoRA targets in one block: qkv, proj, fc1, fc2."""
    return [(3 * d.D, d.D), (d.D, d.D), (d.H, d.D), (d.D, d.H)]


def _glora(d: Dims) -> int:
    return d.L * sum(_glora_layer(out, inp) for out, inp in _linears(d))


def _glora_small(d: Dims) -> int:
    # qkv and fc2 only; A vector (out), B scalar, C lora2 (2 in + 2), D and E none
    return d.L * sum(out + 1 + (2 * inp + 2) for out, inp in ((3 * d.D, d.D), (d.D, d.H)))


ROWS = [
    # NOAH's default: every module at the top of the official VTAB space {1, 5, 10}
    Row("noah", lambda d: _noah(d, [10] * d.L, [10] * d.L, [10] * d.L)),
    Row("noah", lambda d: _noah(d, [1, 0], [0, 4], [5, 0]),
        {"adapter": (1, 0), "lora": (0, 4), "prompt": (5, 0)}),
    Row("noah", lambda d: _noah(d, [4] * d.L, [2] * d.L, [0] * d.L),
        {"adapter": (4,), "lora": (2,), "prompt": (0,)}),
    # only LoRA (B starts at zero): the one NOAH subnet that starts as the base model
    Row("noah", lambda d: _noah(d, [0] * d.L, [4] * d.L, [0] * d.L),
        {"adapter": (0,), "lora": (4,), "prompt": (0,)}, zero_init=True),
    Row("noah", lambda d: _noah(d, [10] * d.L, [10] * d.L, [10] * d.L), {"supernet": True}),
    # D is "none": timm's random init leaves every bias at 0, where b * D can never train (D on
    # non-zero biases is tested in test_methods_issue5.py and on the real DeiT)
    Row("glora", _glora, {"D": "none"}),
    Row("glora", _glora_small, {"targets": ("qkv", "fc2"), "A": "vector", "B": "scalar",
                                "C": "lora2", "D": "none", "E": "none"}),
]
