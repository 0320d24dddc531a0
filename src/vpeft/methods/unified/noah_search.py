"""NOAH's search: the space of subnets, supernet sampling, evolution under a budget, three stages.

A subnet (:class:`Choice`) gives each block an adapter width, a LoRA rank and a prompt count. As
in NOAH, each module type is present in the first ``d`` blocks only, ``d`` drawn from
``space.depths``, with sizes drawn from ``space.adapter`` / ``lora`` / ``prompt`` there.
:func:`evolution_search` follows NOAH's (and AutoFormer's) evolution: a random population, then
per epoch the top ``select`` candidates breed ``mutation`` mutants and ``crossover`` children,
topped up with random ones. A candidate over the parameter budget is never evaluated nor returned.

:func:`run_noah` strings the three stages together with callables, so any training engine can
drive it: ``train_fn(model, before_step)`` trains the model's trainable parameters and, when
``before_step`` is given, calls it before every optimisation step (stage 1: it draws a random
subnet); ``eval_fn(model) -> float`` returns validation accuracy (higher is better).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vpeft.backbones.base import get_view
from vpeft.core.state import adapt
from vpeft.methods.unified.noah import KINDS, noah_param_count, set_subnet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """Per-block sizes of one subnet; ``options()`` are the ``noah`` options that build it."""

    adapter: tuple[int, ...]
    lora: tuple[int, ...]
    prompt: tuple[int, ...]

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KINDS}


@dataclass(frozen=True)
class SearchSpace:
    depth: int  # blocks of the backbone
    dim: int  # block width
    adapter: tuple[int, ...] = (1, 4, 8)  # sizes a present module may take
    lora: tuple[int, ...] = (1, 4, 8)
    prompt: tuple[int, ...] = (1, 5, 10)
    depths: tuple[int, ...] = ()  # leading blocks holding a module type; () = 0, L/4 .. L

    def __post_init__(self) -> None:
        if not self.depths:
            quarters = {round(self.depth * q / 4) for q in range(5)}
            object.__setattr__(self, "depths", tuple(sorted(quarters)))

    @classmethod
    def for_model(cls, model: nn.Module, **sizes: Any) -> SearchSpace:
        view = get_view(model)
        view.require("blocks", "embed_dim", method="noah")
        return cls(view.depth, view.embed_dim, **sizes)

    def supernet_options(self) -> dict[str, Any]:
        """``noah`` options of the supernet that holds every subnet of this space."""
        return {"supernet": True, **{f"max_{k}": max(getattr(self, k)) for k in KINDS}}

    def params(self, c: Choice) -> int:
        return noah_param_count(c.adapter, c.lora, c.prompt, self.dim)

    def _sizes(self, kind: str, d: int, rng: random.Random, keep: tuple[int, ...] = (),
               m_prob: float = 0.0) -> tuple[int, ...]:
        """``d`` leading sizes (kept from ``keep``, each re-drawn with ``m_prob``), then zeros."""
        pool = getattr(self, kind)
        sizes = [keep[i] if i < len(keep) and keep[i] and rng.random() >= m_prob
                 else rng.choice(pool) for i in range(d)]
        return tuple(sizes + [0] * (self.depth - d))

    def sample(self, rng: random.Random) -> Choice:
        return Choice(*(self._sizes(k, rng.choice(self.depths), rng) for k in KINDS))

    def mutate(self, c: Choice, rng: random.Random, m_prob: float, s_prob: float) -> Choice:
        """Per module type, with ``m_prob``: maybe (``s_prob``) a new depth, re-drawn sizes."""
        out = {}
        for k in KINDS:
            sizes = getattr(c, k)
            if rng.random() < m_prob:
                d = sum(1 for s in sizes if s)
                d = rng.choice(self.depths) if rng.random() < s_prob else d
                sizes = self._sizes(k, d, rng, keep=sizes, m_prob=m_prob)
            out[k] = sizes
        return Choice(**out)

    def crossover(self, a: Choice, b: Choice, rng: random.Random) -> Choice:
        return Choice(*(getattr(rng.choice((a, b)), k) for k in KINDS))


@dataclass
class SearchResult:
    choice: Choice
    score: float
    params: int
    evaluated: int
    history: list[float] = field(default_factory=list)  # best score after each epoch


def evolution_search(evaluate: Callable[[Choice], float], budget: int, space: SearchSpace, *,
                     epochs: int = 20, population: int = 50, select: int = 10,
                     mutation: int = 25, crossover: int = 25, m_prob: float = 0.2,
                     s_prob: float = 0.4, min_params: int = 0, seed: int = 0) -> SearchResult:
    """Best subnet by ``evaluate`` with ``min_params <= space.params(c) <= budget`` (NOAH defaults).

    Raises ``ValueError`` if no subnet within the budget is found.
    """
    rng = random.Random(seed)
    scores: dict[Choice, float] = {}

    def legal(c: Choice) -> bool:
        return min_params <= space.params(c) <= budget

    def fresh(make: Callable[[], Choice], n: int, taken: list[Choice]) -> list[Choice]:
        found: list[Choice] = []
        for _ in range(50 * max(n, 1)):  # bounded: a tight budget may admit few subnets
            if len(found) >= n:
                break
            c = make()
            if legal(c) and c not in scores and c not in found and c not in taken:
                found.append(c)
        return found

    candidates = fresh(lambda: space.sample(rng), population, [])
    history: list[float] = []
    for epoch in range(max(epochs, 1)):
        for c in candidates:
            scores[c] = evaluate(c)
        if not scores:
            raise ValueError(f"no NOAH subnet has between {min_params} and {budget} parameters")
        top = sorted(scores, key=scores.__getitem__, reverse=True)[:select]
        history.append(scores[top[0]])
        log.info("noah search epoch %d: best %.4f (%d evaluated)", epoch, history[-1], len(scores))
        if epoch == epochs - 1:
            break
        children = fresh(lambda t=top: space.mutate(rng.choice(t), rng, m_prob, s_prob),
                         mutation, [])
        children += fresh(lambda t=top: space.crossover(rng.choice(t), rng.choice(t), rng),
                          crossover, children)
        candidates = children + fresh(lambda: space.sample(rng), population - len(children),
                                      children)
    best = max(scores, key=scores.__getitem__)
    return SearchResult(best, scores[best], space.params(best), len(scores), history)


@dataclass
class NOAHResult:
    choice: Choice
    search: SearchResult
    supernet: nn.Module
    model: nn.Module  # the retrained subnet, a normal adapted model
    score: float | None = None  # eval_fn of the retrained model


def run_noah(model_fn: Callable[[], nn.Module],
             train_fn: Callable[[nn.Module, Callable[[], None] | None], None],
             eval_fn: Callable[[nn.Module], float], budget: int,
             space: SearchSpace | None = None, seed: int = 0, **search: Any) -> NOAHResult:
    """NOAH's three stages: train the supernet, search under ``budget``, retrain the subnet.

    ``model_fn()`` returns a fresh base model (called twice); ``search`` goes to
    :func:`evolution_search`. The retrained model is ``vpeft.adapt(model_fn(), "noah",
    **choice.options())``: save it with ``vpeft.save`` like any adapter.
    """
    supernet = model_fn()
    space = space or SearchSpace.for_model(supernet)
    adapt(supernet, "noah", **space.supernet_options())
    rng = random.Random(seed)

    def draw() -> None:  # a random subnet for the next step, as NOAH's supernet training
        set_subnet(supernet, *space.sample(rng).options().values())

    train_fn(supernet, draw)

    def evaluate(c: Choice) -> float:
        set_subnet(supernet, c.adapter, c.lora, c.prompt)
        return float(eval_fn(supernet))

    result = evolution_search(evaluate, budget, space, seed=seed, **search)
    log.info("noah: chose %s (%d params, val %.4f)", result.choice, result.params, result.score)
    model = adapt(model_fn(), "noah", **result.choice.options())
    train_fn(model, None)
    return NOAHResult(result.choice, result, supernet, model, float(eval_fn(model)))
