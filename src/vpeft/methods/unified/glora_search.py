"""GLoRA's search space: one form per support tensor (A..E) per layer, for ``vpeft search``.

As the official ``GLoRA/evolution.py`` (Arnav0400/ViT-Slim): A and B take ``LoRA_r``, vector,
constant (scalar) or none; C ``LoRA_r``, vector or none; D and E constant, vector or none, every
layer independently. A random candidate draws every form; a mutation re-draws each form with
``m_prob``; a crossover takes each form from one parent or the other. The official rank is 4
(``--rank 4``); ``rank=[2,4]`` offers both ranks, sliced from one supernet pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.methods.unified.glora import (
    FORMS,
    GLoRAConfig,
    SuperGLoRALinear,
    parse_form,
    target_paths,
)

TENSORS = tuple(FORMS)  # A, B, C, D, E
DEFAULT_RANKS = (GLoRAConfig().max_rank,)
Layer = tuple[str, ...]  # one form per tensor, in TENSORS order


def tensor_params(t: str, form: str, out: int, inp: int) -> int:
    """Parameters of support tensor ``t`` of ``form`` on an ``out x inp`` Linear."""
    kind, rank = parse_form(t, form)
    rows, cols = (inp, 1) if t == "C" else (out, inp)
    if kind == "lora":
        return rank * (rows + cols)
    return {"vector": rows, "scalar": 1, "none": 0}[kind]


@dataclass(frozen=True)
class GLoRASpace:
    """Per-layer GLoRA forms on the targeted Linear layers: ``layers`` holds (out, in, bias)."""

    layers: tuple[tuple[int, int, bool], ...]
    targets: tuple[str, ...]
    rank: tuple[int, ...] = DEFAULT_RANKS

    @classmethod
    def for_view(cls, view: BackboneView, **space: Any) -> GLoRASpace:
        """The space on ``view``'s backbone; ``space`` may set ``rank`` (int or list) and
        ``targets`` (Linear name patterns)."""
        unknown = set(space) - {"rank", "targets"}
        if unknown:
            raise ValueError(f"unknown glora search space key(s) {sorted(unknown)}; use rank or "
                             "targets")
        ranks = space.get("rank", DEFAULT_RANKS)
        ranks = tuple(ranks) if isinstance(ranks, (list, tuple)) else (ranks,)
        if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                for r in ranks):
            raise ValueError(f"glora search space rank expects integers >= 1, got {ranks!r}")
        default = next(f.default for f in fields(GLoRAConfig) if f.name == "targets")
        targets = space.get("targets", default)
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        paths = target_paths(view.model, view, targets)  # raises on a pattern matching nothing
        layers = []
        for p in paths:
            m = view.model.get_submodule(p)
            layers.append((m.out_features, m.in_features, m.bias is not None))
        return cls(tuple(layers), targets, tuple(sorted(set(ranks))))

    def choices(self, t: str, bias: bool = True) -> tuple[str, ...]:
        """The forms tensor ``t`` may take (D is none on a layer without a bias)."""
        if t == "D" and not bias:
            return ("none",)
        out: list[str] = []
        for kind in FORMS[t]:
            out += [f"lora{r}" for r in self.rank] if kind == "lora" else [kind]
        return tuple(out)

    # -- the SearchSpace protocol -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "targets": list(self.targets),
                "rank": list(self.rank), **{t: list(self.choices(t)) for t in TENSORS}}

    def supernet_options(self) -> dict[str, Any]:
        return {"supernet": True, "max_rank": max(self.rank), "targets": list(self.targets)}

    def subnet_options(self, c: tuple[Layer, ...]) -> dict[str, Any]:
        per_layer = [";".join(f"{t}={f}" for t, f in zip(TENSORS, layer)) for layer in c]
        return {"targets": list(self.targets), "per_layer": per_layer}

    def set_subnet(self, model: nn.Module, c: tuple[Layer, ...]) -> None:
        modules = [m for m in model.modules() if isinstance(m, SuperGLoRALinear)]
        if len(modules) != len(c):
            raise ValueError(f"model has {len(modules)} GLoRA supernet layers (is it a GLoRA "
                             f"supernet?), got {len(c)} layer choices")
        for m, layer in zip(modules, c):
            m.set_forms({t: parse_form(t, f) for t, f in zip(TENSORS, layer)})

    def params(self, c: tuple[Layer, ...]) -> int:
        return sum(tensor_params(t, f, out, inp)
                   for (out, inp, _), layer in zip(self.layers, c) for t, f in zip(TENSORS, layer))

    def bounds(self) -> tuple[int, int]:
        largest = tuple(tuple(max(self.choices(t, b), key=lambda f, t=t, o=o, i=i:
                                  tensor_params(t, f, o, i)) for t in TENSORS)
                        for o, i, b in self.layers)
        return 0, self.params(largest)  # every tensor "none" is a subnet: the linear probe

    def sample(self, rng: random.Random) -> tuple[Layer, ...]:
        return tuple(tuple(rng.choice(self.choices(t, b)) for t in TENSORS)
                     for _, _, b in self.layers)

    def mutate(self, c: tuple[Layer, ...], rng: random.Random, m_prob: float,
               s_prob: float) -> tuple[Layer, ...]:
        """Each form re-drawn with ``m_prob`` (``s_prob`` has no role: GLoRA has no depths)."""
        return tuple(tuple(rng.choice(self.choices(t, b)) if rng.random() < m_prob else f
                           for t, f in zip(TENSORS, layer))
                     for (_, _, b), layer in zip(self.layers, c))

    def crossover(self, a: tuple[Layer, ...], b: tuple[Layer, ...],
                  rng: random.Random) -> tuple[Layer, ...]:
        return tuple(tuple(rng.choice(pair) for pair in zip(x, y)) for x, y in zip(a, b))
