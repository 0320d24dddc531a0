"""NOAH's three stages as one resumable job: ``search(SearchConfig) -> dict`` (``vpeft search``).

```
RUN/
  supernet/        stage 1: an engine run folder; the NOAH supernet trained on train800, a random
                   subnet drawn before every step (resumes like any run)
  search.json      stage 2: evolutionary search of subnets under the parameter budget, each scored
                   by top-1 on val200 with the supernet's shared weights (written atomically; a
                   re-run skips stages 1 and 2 when it is there)
  adapter.safetensors, config.yaml, metrics.jsonl, results.json, classes.txt
                   stage 3: the chosen subnet retrained from scratch on train800val200 and
                   evaluated once on test: a normal run folder (vpeft.load, vpeft eval --run)
```

Re-running the same job continues where it stopped: every stage is either skipped (done), resumed
(an engine run with ``resume``) or started. The test split is seen only by stage 3. The training
loop is the engine's (:func:`vpeft.engine.train.train`); stage 1 only adds a ``before_step`` hook
that draws the subnet, as :func:`vpeft.methods.unified.noah_search.run_noah` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from vpeft.core.checkpoint import atomic_write_text
from vpeft.data import data_config, eval_transform, open_dataset
from vpeft.engine.config import TrainConfig, kv_meta, opt
from vpeft.engine.evaluate import evaluate, load_run
from vpeft.engine.runtime import make_accelerator, make_loader, resolve_precision
from vpeft.engine.train import train
from vpeft.methods.unified.noah import KINDS, set_subnet
from vpeft.methods.unified.noah_search import Choice, SearchSpace, evolution_search

logger = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
SUPERNET_DIR = "supernet"


@dataclass
class SearchConfig:
    """A NOAH search job. ``train`` holds the backbone, data, optimisation and execution options
    shared by the two training stages, and the run folder (``train.out``); its method is ignored.
    Field ``supernet_epochs`` is CLI option ``--supernet-epochs``."""

    train: TrainConfig = field(metadata={"help": "options of both training stages; train.out is "
                                                 "the job folder", "saved": True})
    budget: int = opt(help="most trainable parameters (head excluded) of the chosen subnet")
    space: dict[str, Any] = field(default_factory=dict, metadata=kv_meta(
        "search space as KEY=VALUE: adapter / lora / prompt sizes, a list (adapter=[1,4,8]) or a "
        "largest size N for {1, N/2, N} (default adapter=8 lora=8 prompt=10); depths: how many "
        "leading blocks may hold each module type (default 0, L/4, L/2, 3L/4, L)"))
    supernet_epochs: int | None = opt(None, "stage 1 epochs (default: --epochs)")
    retrain_epochs: int | None = opt(None, "stage 3 epochs (default: --epochs)")
    supernet_split: str = opt("train800", "split the supernet trains on")
    val_split: str = opt("val200", "split that scores subnets in the search (never the test)")
    search_epochs: int = opt(20, "evolution generations")
    population: int = opt(50, "candidates of the first generation")
    select: int = opt(10, "best candidates that breed the next generation")
    mutation: int = opt(25, "mutants per generation")
    crossover: int = opt(25, "crossover children per generation")
    m_prob: float = opt(0.2, "mutation probability of a module type and of each of its sizes")
    s_prob: float = opt(0.4, "probability that a mutation also re-draws a module type's depth")
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
        if self.val_split == self.train.splits[1]:
            raise ValueError(f"the search must not score subnets on the evaluation split "
                             f"{self.val_split!r}; choose another val_split")
        search_space_sizes(self.space)  # raises on a bad space

    @property
    def out(self) -> Path:
        return Path(self.train.out)

    def settings(self) -> dict[str, Any]:
        """What the search result depends on; a re-run with other settings raises."""
        skip = ("train", "overwrite", "retrain_epochs")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["space"] = {k: list(v) for k, v in search_space_sizes(self.space).items()}
        out["supernet_epochs"] = self.supernet_epochs or self.train.epochs
        out.update(model=self.train.model, data=os.path.abspath(self.train.data),
                   seed=self.train.seed)
        return out


def search_space_sizes(space: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{"adapter": 8, "lora": [2, 4], "depths": 2}`` -> keyword arguments of
    :class:`SearchSpace`: a largest size ``N`` means ``{1, N/2, N}`` (NOAH's grid)."""
    defaults = {"adapter": 8, "lora": 8, "prompt": 10}
    unknown = set(space) - {*KINDS, "depths"}
    if unknown:
        raise ValueError(f"unknown search space key(s) {sorted(unknown)}; "
                         f"use {', '.join(KINDS)} or depths")
    out: dict[str, tuple[int, ...]] = {}
    for key, value in {**defaults, **space}.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"search space {key} expects integers, got {value!r}")
        if key == "depths":
            if min(values) < 0:
                raise ValueError(f"search space depths must be >= 0, got {value!r}")
            out[key] = tuple(sorted(set(values)))
            continue
        if min(values) < 1:
            raise ValueError(f"search space {key} sizes must be >= 1, got {value!r}")
        if not isinstance(value, (list, tuple)):
            values = [1, value // 2, value]
        out[key] = tuple(sorted({v for v in values if v >= 1}))
    return out


class SubnetSampler:
    """``before_step`` of stage 1: a random subnet of the space for the next step.

    The draws come from ``random.Random(seed)``, the same on every process. A resumed run starts
    the sequence again, so its later epochs see other subnets than an uninterrupted run would.
    """

    def __init__(self, sizes: dict[str, tuple[int, ...]], seed: int) -> None:
        self.sizes, self.rng = sizes, random.Random(seed)
        self.space: SearchSpace | None = None
        self.draws = 0

    def __call__(self, model: nn.Module) -> None:
        if self.space is None:
            self.space = SearchSpace.for_model(model, **self.sizes)
        choice = self.space.sample(self.rng)
        set_subnet(model, choice.adapter, choice.lora, choice.prompt)
        self.draws += 1


def stage_config(config: SearchConfig, **changes: Any) -> TrainConfig:
    """An engine run of the job: ``train`` with the method and run-folder settings of a stage."""
    return dataclasses.replace(config.train, method="noah", val=False, overwrite=config.overwrite,
                               resume=not config.overwrite, **changes)


def search(config: SearchConfig) -> dict[str, Any]:
    """Run (or continue) NOAH's three stages; returns ``{"search": ..., "results": ...}``, the
    contents of ``search.json`` and the final run's ``results.json``."""
    out, sizes = config.out, search_space_sizes(config.space)
    record_file = out / SEARCH_FILE
    if config.overwrite:
        record_file.unlink(missing_ok=True)
    record = read_search(record_file)
    if record is not None and record["settings"] != config.settings():
        diff = [f"{k}: {record['settings'].get(k)!r} != {v!r}"
                for k, v in config.settings().items() if record["settings"].get(k) != v]
        raise ValueError(f"{record_file} was searched with other settings (pass --overwrite to "
                         "start again, or another --out):\n  " + "\n  ".join(diff))

    if record is None:
        # -- stage 1: the supernet, a random subnet per step ----------------------------------
        supernet = out / SUPERNET_DIR
        logger.info("stage 1/3: training the NOAH supernet on %s -> %s", config.supernet_split,
                    supernet)
        max_sizes = {f"max_{k}": max(sizes[k]) for k in KINDS}
        train(stage_config(config, method_args={"supernet": True, **max_sizes},
                           out=str(supernet), epochs=config.supernet_epochs or config.train.epochs,
                           train_split=config.supernet_split, eval_split=config.val_split),
              before_step=SubnetSampler(sizes, config.train.seed))
        # -- stage 2: evolution on the validation split under the budget ----------------------
        logger.info("stage 2/3: evolutionary search on %s under %d parameters", config.val_split,
                    config.budget)
        record = run_search(config, supernet, sizes)
    else:
        logger.info("stages 1-2/3: %s is there; skipping the supernet and the search "
                    "(chose %s, %d parameters)", record_file, record["choice"], record["params"])

    # -- stage 3: retrain the chosen subnet, evaluate once ------------------------------------
    final = stage_config(config, method_args=record["choice"],
                         epochs=config.retrain_epochs or config.train.epochs)
    logger.info("stage 3/3: retraining the chosen subnet on %s, evaluating on %s -> %s",
                *final.splits, out)
    results = train(final)
    return {"search": record, "results": results}


def run_search(config: SearchConfig, supernet: Path,
               sizes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Stage 2: score subnets of the trained supernet in run folder ``supernet`` on the
    validation split; write and return the search record."""
    tc = config.train
    model, saved, classes = load_run(supernet)
    precision = resolve_precision(tc.precision, tc.cpu)
    accelerator = make_accelerator(precision, tc.cpu)
    dataset = open_dataset(tc.data, config.val_split, classes=classes)
    dataset.transform = eval_transform(data_config(model, saved.img_size))
    loader = accelerator.prepare(make_loader(dataset, tc.eval_batch_size or tc.batch_size,
                                             tc.num_workers))
    model.to(accelerator.device)
    space = SearchSpace.for_model(model, **sizes)
    evaluated: list[dict[str, Any]] = []

    def score(c: Choice) -> float:
        set_subnet(model, c.adapter, c.lora, c.prompt)
        n = len(evaluated) + 1
        top1 = evaluate(model, loader, accelerator, tc.progress, desc=f"subnet {n}").top1
        evaluated.append({**c.options(), "params": space.params(c), "top1": top1})
        logger.info("subnet %d: %s  %d params  %s top-1 %.2f%%", n, c, space.params(c),
                    config.val_split, top1)
        return top1

    result = evolution_search(score, config.budget, space, epochs=config.search_epochs,
                              population=config.population, select=config.select,
                              mutation=config.mutation, crossover=config.crossover,
                              m_prob=config.m_prob, s_prob=config.s_prob,
                              min_params=config.min_params, seed=tc.seed)
    record = {
        "choice": {k: list(v) for k, v in result.choice.options().items()},
        "params": result.params, "budget": config.budget, "split": config.val_split,
        "top1": result.score, "history": result.history, "evaluated": evaluated,
        "space": {"depth": space.depth, "dim": space.dim,
                  **{k: list(getattr(space, k)) for k in (*KINDS, "depths")}},
        "supernet": str(supernet), "settings": config.settings(),
    }
    logger.info("search chose %s: %d parameters (budget %d), %s top-1 %.2f%%", result.choice,
                result.params, config.budget, config.val_split, result.score)
    if accelerator.is_main_process:
        atomic_write_text(config.out / SEARCH_FILE, json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return record


def read_search(path: Path) -> dict[str, Any] | None:
    """The search record at ``path``, or None when the search has not finished."""
    return json.loads(path.read_text()) if path.is_file() else None
