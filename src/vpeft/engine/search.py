"""A unified method's three stages as one resumable job: ``search(SearchConfig) -> dict``.

``vpeft search --method noah|glora``. The engine knows no method: it asks the method's
:class:`~vpeft.core.method.SearchSpace` (``Method.search_space``) for the supernet's options, a
random subnet per step, candidates to evolve, their parameter counts and the retrained subnet's
options. The whole plan (space, budget, the supernet's options) is checked before anything trains.

```
RUN/
  supernet/        stage 1: an engine run folder; the method's supernet trained on train800, a
                   random subnet drawn before every step (resumes like any run)
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
that draws the subnet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

from torch import nn

from vpeft.backbones.base import get_view
from vpeft.core.checkpoint import atomic_write_text
from vpeft.core.method import SearchSpace
from vpeft.data import data_config, eval_transform, open_dataset
from vpeft.engine.config import TrainConfig
from vpeft.engine.evaluate import evaluate, load_run
from vpeft.engine.evolution import evolution_search
from vpeft.engine.model import build_backbone
from vpeft.engine.runtime import make_accelerator, make_loader, resolve_precision
from vpeft.engine.search_config import SearchConfig
from vpeft.engine.train import train
from vpeft.registry import get_method, make_config

logger = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
SUPERNET_DIR = "supernet"


def plan(config: SearchConfig) -> SearchSpace:
    """The job's search space, with the whole plan checked before anything trains: the space's
    keys, the supernet's options, and a budget that some subnet fits."""
    tc = config.train
    # the architecture only (no weights): what the space depends on is the shape of the model
    model = build_backbone(tc.model, 2, None, False, tc.img_size, tc.model_args)
    space = get_method(config.method).search_space(get_view(model), **config.space)
    make_config(config.method, **space.supernet_options())  # raises on a bad supernet option
    low, high = space.bounds()
    what = f"the {config.method} search space on {tc.model} ({space.describe()})"
    if config.budget < low:
        raise ValueError(f"budget {config.budget} is below the smallest subnet of {what}: "
                         f"{low} parameters (head excluded); raise --budget to at least {low} "
                         "or shrink the space")
    if config.min_params > min(high, config.budget):
        raise ValueError(f"min_params {config.min_params} is above the largest subnet within "
                         f"the budget ({min(high, config.budget)} parameters) of {what}")
    return space


class SubnetSampler:
    """``before_step`` of stage 1: a random subnet of the space for the next step.

    The draws come from ``random.Random(seed)``, the same on every process. A resumed run starts
    the sequence again, so its later epochs see other subnets than an uninterrupted run would.
    """

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space, self.rng = space, random.Random(seed)
        self.draws = 0

    def __call__(self, model: nn.Module) -> None:
        self.space.set_subnet(model, self.space.sample(self.rng))
        self.draws += 1


def stage_config(config: SearchConfig, **changes: Any) -> TrainConfig:
    """An engine run of the job: ``train`` with the method and run-folder settings of a stage."""
    return dataclasses.replace(config.train, method=config.method, val=False,
                               overwrite=config.overwrite, resume=not config.overwrite, **changes)


def search(config: SearchConfig) -> dict[str, Any]:
    """Run (or continue) the three stages; returns ``{"search": ..., "results": ...}``, the
    contents of ``search.json`` and the final run's ``results.json``."""
    out, space = config.out, plan(config)
    settings = config.settings(space)
    record_file = out / SEARCH_FILE
    if config.overwrite:
        record_file.unlink(missing_ok=True)
    record = read_search(record_file)
    if record is not None and record["settings"] != settings:
        diff = [f"{k}: {record['settings'].get(k)!r} != {v!r}"
                for k, v in settings.items() if record["settings"].get(k) != v]
        raise ValueError(f"{record_file} was searched with other settings (pass --overwrite to "
                         "start again, or another --out):\n  " + "\n  ".join(diff))

    if record is None:
        # -- stage 1: the supernet, a random subnet per step ----------------------------------
        supernet = out / SUPERNET_DIR
        logger.info("stage 1/3: training the %s supernet on %s -> %s", config.method,
                    config.supernet_split, supernet)
        train(stage_config(config, method_args=space.supernet_options(),
                           out=str(supernet), epochs=config.supernet_epochs or config.train.epochs,
                           train_split=config.supernet_split, eval_split=config.val_split),
              before_step=SubnetSampler(space, config.train.seed))
        # -- stage 2: evolution on the validation split under the budget ----------------------
        logger.info("stage 2/3: evolutionary search on %s under %d parameters", config.val_split,
                    config.budget)
        record = run_search(config, supernet, space, settings)
    else:
        logger.info("stages 1-2/3: %s is there; skipping the supernet and the search "
                    "(%d parameters)", record_file, record["params"])

    # -- stage 3: retrain the chosen subnet, evaluate once ------------------------------------
    final = stage_config(config, method_args=record["choice"],
                         epochs=config.retrain_epochs or config.train.epochs)
    logger.info("stage 3/3: retraining the chosen subnet on %s, evaluating on %s -> %s",
                *final.splits, out)
    results = train(final)
    return {"search": record, "results": results}


def run_search(config: SearchConfig, supernet: Path, space: SearchSpace,
               settings: dict[str, Any]) -> dict[str, Any]:
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
    evaluated: list[dict[str, Any]] = []

    def score(c: Any) -> float:
        space.set_subnet(model, c)
        n = len(evaluated) + 1
        top1 = evaluate(model, loader, accelerator, tc.progress, desc=f"subnet {n}").top1
        evaluated.append({**space.subnet_options(c), "params": space.params(c), "top1": top1})
        logger.info("subnet %d: %d params  %s top-1 %.2f%%", n, space.params(c),
                    config.val_split, top1)
        return top1

    result = evolution_search(score, config.budget, space, epochs=config.search_epochs,
                              population=config.population, select=config.select,
                              mutation=config.mutation, crossover=config.crossover,
                              m_prob=config.m_prob, s_prob=config.s_prob,
                              min_params=config.min_params, seed=tc.seed)
    record = {
        "method": config.method, "choice": space.subnet_options(result.choice),
        "params": result.params, "budget": config.budget, "split": config.val_split,
        "top1": result.score, "history": result.history, "evaluated": evaluated,
        "space": space.describe(), "supernet": str(supernet), "settings": settings,
    }
    logger.info("search chose %s: %d parameters (budget %d), %s top-1 %.2f%%", record["choice"],
                result.params, config.budget, config.val_split, result.score)
    if accelerator.is_main_process:
        atomic_write_text(config.out / SEARCH_FILE, json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return record


def read_search(path: Path) -> dict[str, Any] | None:
    """The search record at ``path``, or None when the search has not finished."""
    return json.loads(path.read_text()) if path.is_file() else None
