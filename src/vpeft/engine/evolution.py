"""Evolutionary search over any method's :class:`~vpeft.core.method.SearchSpace` under a budget.

NOAH's and GLoRA's official searches are the same algorithm (after AutoFormer): a random
population, then per epoch the top ``select`` candidates breed ``mutation`` mutants and
``crossover`` children, topped up with random ones. A candidate outside
``min_params <= params <= budget`` is never evaluated nor returned.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from vpeft.core.method import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    choice: Any  # the space's candidate
    score: float
    params: int
    evaluated: int
    history: list[float] = field(default_factory=list)  # best score after each epoch


def evolution_search(evaluate: Callable[[Any], float], budget: int, space: SearchSpace, *,
                     epochs: int = 20, population: int = 50, select: int = 10,
                     mutation: int = 25, crossover: int = 25, m_prob: float = 0.2,
                     s_prob: float = 0.4, min_params: int = 0, seed: int = 0) -> SearchResult:
    """Best candidate by ``evaluate`` (higher is better) within the parameter bounds.

    Defaults are the official NOAH / GLoRA ones. Raises ``ValueError`` if no candidate within the
    budget is found.
    """
    rng = random.Random(seed)
    scores: dict[Hashable, float] = {}

    def legal(c: Hashable) -> bool:
        return min_params <= space.params(c) <= budget

    def fresh(make: Callable[[], Hashable], n: int, taken: list[Hashable]) -> list[Hashable]:
        found: list[Hashable] = []
        for _ in range(50 * max(n, 1)):  # bounded: a tight budget may admit few candidates
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
            raise ValueError(f"no subnet with between {min_params} and {budget} parameters was "
                             "found; raise the budget")
        top = sorted(scores, key=scores.__getitem__, reverse=True)[:select]
        history.append(scores[top[0]])
        log.info("search epoch %d: best %.4f (%d evaluated)", epoch, history[-1], len(scores))
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
