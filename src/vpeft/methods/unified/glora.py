"""GLoRA (Chavan et al., 2023, arXiv:2306.07967): a generalised, fully mergeable LoRA.

Every targeted Linear ``y = W x + b`` becomes

    W' = W + W * A + B,      b' = b + b * D + E + W C

with ``*`` elementwise (broadcast) and five support tensors, each of a chosen form:

* ``A``, ``B`` (out x in): ``lora<r>`` (a rank-r product ``down @ up``), ``vector`` (one value per
  output row), ``scalar`` or ``none``;
* ``C`` (in x 1): ``lora<r>``, ``vector`` or ``none``;
* ``D``, ``E`` (out): ``vector``, ``scalar`` or ``none``.

GLoRA searches these forms per layer with an evolutionary search over a weight-sharing supernet;
this method takes the result: one form per tensor for every layer (defaults below), optionally
overridden per layer with ``per_layer`` (``D`` is left out on layers without a bias). Every
``down`` and every non-LoRA tensor starts at zero
(as the reference code), so the adapted model starts equal to the base, and merging computes
``W'`` and ``b'`` once, leaving a plain ``nn.Linear``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, _bias_of, linear_targets
from vpeft.core.method import Method
from vpeft.core.surgery import wrap
from vpeft.registry import register

FORMS = {"A": ("lora", "vector", "scalar", "none"), "B": ("lora", "vector", "scalar", "none"),
         "C": ("lora", "vector", "none"), "D": ("vector", "scalar", "none"),
         "E": ("vector", "scalar", "none")}


def parse_form(tensor: str, form: str) -> tuple[str, int]:
    """``'lora4'`` -> ``('lora', 4)``, ``'vector'`` -> ``('vector', 0)``; checks it is allowed."""
    m = re.fullmatch(r"(lora)(\d+)|(vector|scalar|none)", form.strip().lower())
    kind, rank = (m.group(1), int(m.group(2))) if m and m.group(1) else (m and m.group(3), 0)
    if not kind or kind not in FORMS[tensor] or (kind == "lora" and rank < 1):
        allowed = ", ".join(f + "<r>" if f == "lora" else f for f in FORMS[tensor])
        raise ValueError(f"glora {tensor}={form!r} is not one of: {allowed}")
    return kind, rank


@dataclass
class GLoRAConfig(MethodConfig):
    targets: tuple[str, ...] = option(("qkv", "proj", "fc1", "fc2"), "Linear layers to adapt, "
                                      "by name pattern (GLoRA adapts every Linear of the blocks).")
    A: str = option("lora4", "Form of A (weight scale): lora<r>, vector, scalar or none.")
    B: str = option("lora4", "Form of B (weight shift): lora<r>, vector, scalar or none.")
    C: str = option("vector", "Form of C (bias from W C): lora<r>, vector or none.")
    D: str = option("vector", "Form of D (bias scale): vector, scalar or none (left out on "
                              "layers without a bias).")
    E: str = option("vector", "Form of E (bias shift): vector, scalar or none.")
    per_layer: tuple[str, ...] = option((), "Searched forms, one entry per targeted layer in model "
                                            "order, e.g. 'A=lora8;B=none;D=scalar' (others: "
                                            "the defaults above).")

    def validate(self) -> None:
        for layer in ("", *self.per_layer):
            self.forms(layer)

    def forms(self, layer: str = "") -> dict[str, tuple[str, int]]:
        """The forms of one layer: the defaults overridden by ``layer`` ('A=lora8;C=none').

        Items are separated by ';' (',' also works from Python; the CLI splits lists at commas).
        """
        chosen = {t: getattr(self, t) for t in FORMS}
        for item in filter(None, (s.strip() for s in re.split("[;,]", layer))):
            key, _, value = item.partition("=")
            if key.strip() not in FORMS:
                raise ValueError(f"glora per_layer entry {layer!r}: unknown tensor {key!r}")
            chosen[key.strip()] = value
        return {t: parse_form(t, f) for t, f in chosen.items()}


class GLoRALinear(LinearUpdate):
    """``F.linear(x, W + W*A + B, b + b*D + E + W C)`` with the support tensors of ``forms``."""

    through_weight = True  # the update is defined on the weights

    def __init__(self, base: nn.Linear, forms: dict[str, tuple[str, int]]) -> None:
        super().__init__(base)
        out, inp = base.out_features, base.in_features
        shapes = {"A": (out, inp), "B": (out, inp), "C": (inp, 1), "D": (out,), "E": (out,)}
        if base.bias is None:
            forms = {**forms, "D": ("none", 0)}  # b * D is 0 without a bias: no dead parameters
        self.forms = forms
        for t, (kind, rank) in forms.items():
            if kind == "lora":  # down starts at zero, up as a Linear weight (Kaiming)
                rows, cols = shapes[t]
                down = nn.Parameter(base.weight.new_zeros(rows, rank))
                self.register_parameter(f"{t}_down", down)
                up = nn.Parameter(base.weight.new_empty(rank, cols))
                nn.init.kaiming_uniform_(up, a=math.sqrt(5))
                self.register_parameter(f"{t}_up", up)
            elif kind == "vector":
                size = shapes[t][0]
                shape = (size, 1) if len(shapes[t]) == 2 else (size,)
                self.register_parameter(t, nn.Parameter(base.weight.new_zeros(shape)))
            elif kind == "scalar":
                self.register_parameter(t, nn.Parameter(base.weight.new_zeros(())))

    def support(self, t: str) -> torch.Tensor | None:
        kind = self.forms[t][0]
        if kind == "none":
            return None
        if kind == "lora":
            return getattr(self, f"{t}_down") @ getattr(self, f"{t}_up")
        return getattr(self, t)

    def delta_weight(self) -> torch.Tensor:
        w, a, b = self.base.weight, self.support("A"), self.support("B")
        delta = torch.zeros_like(w) if a is None else w * a
        return delta if b is None else delta + b

    def delta_bias(self) -> torch.Tensor | None:
        w, bias = self.base.weight, self.base.bias
        c, d, e = self.support("C"), self.support("D"), self.support("E")
        if c is None and e is None and (d is None or bias is None):
            return None  # no bias change: a bias-less layer stays bias-less when merged
        delta = w.new_zeros(w.shape[0])
        if d is not None and bias is not None:
            delta = delta + bias * d
        if e is not None:
            delta = delta + e
        return delta if c is None else delta + (w @ c).squeeze(-1)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        dw, db = self.delta_weight(), self.delta_bias()  # both from the original W and b
        self.base.weight += dw
        if db is not None:
            _bias_of(self.base).add_(db)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        # W' = W (1 + A) + B  and  b' = b (1 + D) + E + W C, solved for W and b
        w, b = self.base.weight, self.base.bias
        a, bb, c = self.support("A"), self.support("B"), self.support("C")
        d, e = self.support("D"), self.support("E")
        if bb is not None:
            w -= bb
        if a is not None:
            w /= 1 + a
        if e is not None:
            b -= e
        if c is not None:
            b -= (w @ c).squeeze(-1)
        if d is not None:
            b /= 1 + d


@register
class GLoRA(Method):
    """GLoRA: W + W*A + B and b + b*D + E + W C per layer, with searched forms; mergeable."""

    name = "glora"
    config_cls = GLoRAConfig
    family = "unified"
    subfamily = "unified"
    mergeable = True
    structure_preserving = True
    inference_overhead = False
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: GLoRAConfig = self.config
        paths = [p for p, _ in linear_targets(model, view, cfg.targets, "qkv", self.name)]
        if cfg.per_layer and len(cfg.per_layer) != len(paths):
            raise ValueError(f"glora per_layer has {len(cfg.per_layer)} entries but the targets "
                             f"match {len(paths)} layers")
        for i, path in enumerate(paths):
            forms = cfg.forms(cfg.per_layer[i] if cfg.per_layer else "")
            wrap(model, path, lambda m, f=forms: GLoRALinear(m, f))
