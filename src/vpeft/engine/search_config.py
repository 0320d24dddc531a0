"""The options of a search job (``vpeft search``): light, so the CLI builds its flags without
importing torch; the engine that runs them is :mod:`vpeft.engine.search`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpeft.engine.config import TrainConfig, kv_meta, opt
from vpeft.registry import get_method, list_methods

if TYPE_CHECKING:
    from vpeft.core.method import SearchSpace


@dataclass
class SearchConfig:
    """A search job. ``train`` holds the backbone, data, optimisation and execution options
    shared by the two training stages, and the run folder (``train.out``); its method is ignored.
    Field ``supernet_epochs`` is CLI option ``--supernet-epochs``."""

    train: TrainConfig = field(metadata={"help": "options of both training stages; train.out is "
                                                 "the job folder", "saved": True})
    budget: int = opt(help="most trainable parameters (head excluded) of the chosen subnet")
    method: str = opt(help="the unified method to search (searchable = yes in `vpeft methods`)")
    space: dict[str, Any] = field(default_factory=dict, metadata=kv_meta(
        "KEY=VALUE overrides of the method's search space (default: the paper's space; the keys "
        "are listed below)"))
    supernet_epochs: int | None = opt(None, "stage 1 epochs (default: --epochs)")
    retrain_epochs: int | None = opt(None, "stage 3 epochs (default: --epochs)")
    supernet_split: str = opt("train800", "split the supernet trains on")
    val_split: str = opt("val200", "split that scores subnets in the search (never the test)")
    search_epochs: int = opt(20, "evolution generations")
    population: int = opt(50, "candidates of the first generation")
    select: int = opt(10, "best candidates that breed the next generation")
    mutation: int = opt(25, "mutants per generation")
    crossover: int = opt(25, "crossover children per generation")
    m_prob: float = opt(0.2, "mutation probability (of a module type / a tensor's form)")
    s_prob: float = opt(0.4, "probability that a mutation also re-draws a depth (spaces with "
                             "depths)")
    min_params: int = opt(0, "fewest trainable parameters (head excluded) of a candidate")
    overwrite: bool = opt(False, "start the whole job again (default: continue it)", saved=False)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 parameter, got {self.budget}")
        for name in ("supernet_epochs", "retrain_epochs"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("search_epochs", "population", "select"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("m_prob", "s_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.val_split == self.train.splits[1]:
            raise ValueError(f"the search must not score subnets on the evaluation split "
                             f"{self.val_split!r}; choose another val_split")
        try:
            searchable = get_method(self.method).searchable
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if not searchable:
            names = ", ".join(m.name for m in list_methods() if m.searchable)
            raise ValueError(f"method '{self.method}' has no search; searchable: {names}")

    @property
    def out(self) -> Path:
        return Path(self.train.out)

    def settings(self, space: SearchSpace) -> dict[str, Any]:
        """What the search result depends on; a re-run with other settings raises."""
        skip = ("train", "overwrite", "retrain_epochs", "space")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["space"] = space.describe()
        out["supernet_epochs"] = self.supernet_epochs or self.train.epochs
        out.update(model=self.train.model, data=os.path.abspath(self.train.data),
                   seed=self.train.seed)
        return out

