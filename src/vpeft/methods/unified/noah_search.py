"""NOAH's search space: per-block Adapter / LoRA / prompt sizes, for ``vpeft search``.

A subnet (:class:`Choice`) gives each block an adapter width, a LoRA rank and a prompt count. As
NOAH's ``evolution.py``, each module type is present in the first ``d`` blocks only, ``d`` drawn
from the type's depths, with sizes drawn from the type's sizes there; a mutation of a type (with
``m_prob``) re-draws its depth (with ``s_prob``), keeping the sizes of the blocks it keeps and
drawing the new ones; a crossover takes each type's sizes from one parent or the other.

Defaults are NOAH's VTAB-1k space (``experiments/NOAH/supernet/supernet-B_prompt_VTAB.yaml``):
sizes {1, 5, 10} for all three types and depths {3, 6, 9, 12} on ViT-B's 12 blocks, i.e. a
quarter, a half, three quarters and all of the blocks (:func:`default_depths`).

A subnet's size is its trainable parameters, head excluded, exactly as ``vpeft.summary`` counts
the retrained adapter. The official ``get_sampled_params_numel`` also counts its input-level
prompt and that prompt's 100-token position embedding (never trained, see
:mod:`~vpeft.methods.unified.noah`), so its budgets are larger by about ``(p_0 + 100) D``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.methods.unified.noah import KINDS, SPACE_SIZES, noah_param_count, set_subnet


def default_depths(depth: int) -> tuple[int, ...]:
    """NOAH's depths {L/4, L/2, 3L/4, L} ({3, 6, 9, 12} for 12 blocks), at least 1 each."""
    return tuple(sorted({max(1, round(depth * q / 4)) for q in range(1, 5)}))


@dataclass(frozen=True)
class Choice:
    """Per-block sizes of one subnet; ``options()`` are the ``noah`` options that build it."""

    adapter: tuple[int, ...]
    lora: tuple[int, ...]
    prompt: tuple[int, ...]

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KINDS}

    def __str__(self) -> str:
        return " ".join(f"{k}={list(getattr(self, k))}" for k in KINDS)


def _ints(key: str, value: Any, least: int) -> tuple[int, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"noah search space {key} expects integers, got {value!r}")
    if min(values) < least:
        raise ValueError(f"noah search space {key} must be >= {least}, got {value!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class NOAHSpace:
    """The subnets of NOAH on a backbone of ``depth`` blocks of width ``dim``."""

    depth: int
    dim: int
    adapter: tuple[int, ...] = SPACE_SIZES  # sizes a present module may take
    lora: tuple[int, ...] = SPACE_SIZES
    prompt: tuple[int, ...] = SPACE_SIZES
    depths: tuple[int, ...] = ()  # leading blocks holding a module type; () = default_depths

    def __post_init__(self) -> None:
        if not self.depths:
            object.__setattr__(self, "depths", default_depths(self.depth))
        if max(self.depths) > self.depth:
            raise ValueError(f"noah search space depths {list(self.depths)} exceed the "
                             f"backbone's {self.depth} blocks")

    @classmethod
    def for_view(cls, view: BackboneView, **space: Any) -> NOAHSpace:
        """The space on ``view``'s backbone; ``space`` overrides sizes (a list, or a largest
        size ``N`` for NOAH's grid {1, N/2, N}) and ``depths``."""
        view.require("blocks", "embed_dim", method="noah")
        unknown = set(space) - {*KINDS, "depths"}
        if unknown:
            raise ValueError(f"unknown noah search space key(s) {sorted(unknown)}; use "
                             f"{', '.join(KINDS)} or depths")
        sizes: dict[str, tuple[int, ...]] = {}
        for key, value in space.items():
            if key == "depths":
                sizes[key] = _ints(key, value, 0)
            elif isinstance(value, (list, tuple)):
                sizes[key] = _ints(key, value, 1)
            else:
                top = _ints(key, value, 1)[0]
                sizes[key] = tuple(sorted({1, max(1, top // 2), top}))
        return cls(view.depth, view.embed_dim, **sizes)

    # -- the SearchSpace protocol -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"depth": self.depth, "dim": self.dim,
                **{k: list(getattr(self, k)) for k in (*KINDS, "depths")}}

    def supernet_options(self) -> dict[str, Any]:
        """``noah`` options of the supernet that holds every subnet of this space."""
        return {"supernet": True, **{f"max_{k}": max(getattr(self, k)) for k in KINDS}}

    def subnet_options(self, c: Choice) -> dict[str, Any]:
        return {k: list(v) for k, v in c.options().items()}

    def set_subnet(self, model: nn.Module, c: Choice) -> None:
        set_subnet(model, list(c.adapter), list(c.lora), list(c.prompt))

    def params(self, c: Choice) -> int:
        return noah_param_count(c.adapter, c.lora, c.prompt, self.dim)

    def bounds(self) -> tuple[int, int]:
        def at(pick, d: int) -> int:
            sizes = {k: (pick(getattr(self, k)),) * d + (0,) * (self.depth - d) for k in KINDS}
            return noah_param_count(sizes["adapter"], sizes["lora"], sizes["prompt"], self.dim)

        return at(min, min(self.depths)), at(max, max(self.depths))

    def _sizes(self, kind: str, d: int, rng: random.Random,
               keep: tuple[int, ...] = ()) -> tuple[int, ...]:
        """``d`` leading sizes (those of ``keep`` where it has one), then zeros."""
        pool = getattr(self, kind)
        sizes = [keep[i] if i < len(keep) and keep[i] else rng.choice(pool) for i in range(d)]
        return tuple(sizes + [0] * (self.depth - d))

    def sample(self, rng: random.Random) -> Choice:
        return Choice(*(self._sizes(k, rng.choice(self.depths), rng) for k in KINDS))

    def mutate(self, c: Choice, rng: random.Random, m_prob: float, s_prob: float) -> Choice:
        """Per module type, with ``m_prob``: with ``s_prob`` a new depth (NOAH's mutation)."""
        out = {}
        for k in KINDS:
            sizes = getattr(c, k)
            if rng.random() < m_prob:
                d = sum(1 for s in sizes if s)
                d = rng.choice(self.depths) if rng.random() < s_prob else d
                sizes = self._sizes(k, d, rng, keep=sizes)
            out[k] = sizes
        return Choice(**out)

    def crossover(self, a: Choice, b: Choice, rng: random.Random) -> Choice:
        return Choice(*(getattr(rng.choice((a, b)), k) for k in KINDS))
