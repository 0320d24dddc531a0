"""GLoRA (Chavan et al., 2023, arXiv:2306.07967): a generalised, fully mergeable LoRA.

Every targeted Linear ``y = W x + b`` becomes

    W' = W + W * A + B,      b' = b + b * D + E + W C

with ``*`` elementwise (broadcast) and five support tensors, each of a chosen form:

* ``A``, ``B`` (out x in): ``lora<r>`` (a rank-r product ``down @ up``), ``vector`` (one value per
  output row), ``scalar`` or ``none``;
* ``C`` (in x 1): ``lora<r>``, ``vector`` or ``none``;
* ``D``, ``E`` (out): ``vector``, ``scalar`` or ``none``.

GLoRA finds these forms per layer in three stages, as the official code (``GLoRA/supernet.py``,
``layer.py``, ``evolution.py`` in Arnav0400/ViT-Slim); ``vpeft search --method glora`` runs them:

1. a supernet (``supernet=True``): every layer holds rank-``max_rank`` ``down``/``up`` pairs for
   A, B and C and vectors D, E, and each step draws every layer's forms at random. The forms
   share weights as in the official ``SuperScalableLinear``: ``lora<r>`` is the first ``r``
   columns/rows of the pair, ``vector`` the first column of ``down``, ``scalar`` its first entry
   (D and E: the vector and its first entry);
2. an evolutionary search of per-layer forms under a parameter budget on a validation split
   (:mod:`vpeft.methods.unified.glora_search`);
3. the chosen forms retrained from scratch: ``per_layer`` below, one entry per layer.

Without ``per_layer`` every layer takes the default forms below (``D`` is left out on layers
without a bias). Every ``down`` and every non-LoRA tensor starts at zero and every ``up``
Xavier-uniform (as the reference code), so the adapted model starts equal to the base, and
merging computes ``W'`` and ``b'`` once, leaving a plain ``nn.Linear``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, _bias_of, linear_targets
from vpeft.core.method import Method, SearchSpace
from vpeft.core.recompute import recompute_norm_and_act_outputs
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
    supernet: bool = option(False, "Build GLoRA's weight-sharing supernet (stage 1 of `vpeft "
                                   "search`): every form of every tensor, drawn per step.")
    max_rank: int = option(4, "Supernet: rank of the shared A/B/C pairs (the official --rank 4).")

    def validate(self) -> None:
        if self.max_rank < 1:
            raise ValueError(f"glora max_rank must be >= 1, got {self.max_rank}")
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


def target_paths(model: nn.Module, view: BackboneView, targets: tuple[str, ...]) -> list[str]:
    """The Linear layers GLoRA adapts, in model order (the classifier heads left out; ``qkv``
    is the attention's projections, fused or separate, as the view knows them). The default
    targets on a family without attention (ConvNeXt) mean every Linear of its MLPs."""
    default = GLoRAConfig.__dataclass_fields__["targets"].default
    if tuple(targets) == default and not view.has_qkv and view.blocks:
        return view.update_targets((nn.Linear,), method="glora")
    return [p for p, _ in linear_targets(model, view, targets, "qkv", "glora")]


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
            if kind == "lora":
                self._lora_pair(t, shapes[t], rank)
            elif kind == "vector":
                size = shapes[t][0]
                shape = (size, 1) if len(shapes[t]) == 2 else (size,)
                self.register_parameter(t, nn.Parameter(base.weight.new_zeros(shape)))
            elif kind == "scalar":
                self.register_parameter(t, nn.Parameter(base.weight.new_zeros(())))

    def _lora_pair(self, t: str, shape: tuple[int, ...], rank: int) -> None:
        """``t_down`` (rows x rank) at zero and ``t_up`` (rank x cols) Xavier-uniform."""
        w = self.base.weight
        self.register_parameter(f"{t}_down", nn.Parameter(w.new_zeros(shape[0], rank)))
        up = nn.Parameter(w.new_empty(rank, shape[1]))
        nn.init.xavier_uniform_(up)
        self.register_parameter(f"{t}_up", up)

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


class SuperGLoRALinear(GLoRALinear):
    """GLoRA's supernet layer: shared tensors from which every form of ``forms`` is sliced."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        full = {"A": ("lora", rank), "B": ("lora", rank), "C": ("lora", rank),
                "D": ("vector", 0), "E": ("vector", 0)}
        super().__init__(base, full)
        self.capacity = rank
        self.has_bias = base.bias is not None

    def support(self, t: str) -> torch.Tensor | None:
        kind, rank = self.forms[t]
        if kind == "none":
            return None
        if t in ("D", "E"):
            vec = getattr(self, t)
            return vec if kind == "vector" else vec[0]
        down, up = getattr(self, f"{t}_down"), getattr(self, f"{t}_up")
        if kind == "lora":
            return down[:, :rank] @ up[:rank]
        return down[:, :1] if kind == "vector" else down[0, 0]

    def set_forms(self, forms: dict[str, tuple[str, int]]) -> None:
        """Compute with ``forms`` from now on (ranks up to the supernet's)."""
        if not self.has_bias:
            forms = {**forms, "D": ("none", 0)}
        for t, (kind, rank) in forms.items():
            if kind == "lora" and rank > self.capacity:
                raise ValueError(f"glora {t}=lora{rank} exceeds the supernet's rank "
                                 f"{self.capacity}")
        self.forms = forms


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
    searchable = True

    @classmethod
    def search_space(cls, view: BackboneView, **space: Any) -> SearchSpace:
        from vpeft.methods.unified.glora_search import GLoRASpace  # the space needs the method

        return GLoRASpace.for_view(view, **space)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: GLoRAConfig = self.config
        paths = target_paths(model, view, cfg.targets)
        if cfg.supernet:
            for path in paths:
                wrap(model, path, lambda m: SuperGLoRALinear(m, cfg.max_rank))
            return
        if cfg.per_layer and len(cfg.per_layer) != len(paths):
            raise ValueError(f"glora per_layer has {len(cfg.per_layer)} entries but the targets "
                             f"match {len(paths)} layers")
        for i, path in enumerate(paths):
            forms = cfg.forms(cfg.per_layer[i] if cfg.per_layer else "")
            wrap(model, path, lambda m, f=forms: GLoRALinear(m, f))
        # through the weight, every adapted Linear keeps its input: recompute those that are a
        # norm's or the MLP activation's output instead (see vpeft.core.recompute)
        recompute_norm_and_act_outputs(model, [model.get_submodule(b) for b in view.blocks])
