"""A unified method's three stages in one resumable command: supernet, evolution, retraining.

Examples:
  # search NOAH subnets of at most 100k parameters on a VTAB-1k task (NOAH's VTAB space)
  vpeft search --method noah --model deit_tiny_patch16_224 \\
      --weights ../shared/weights/deit_tiny_patch16_224.fb_in1k.safetensors \\
      --data ../shared/data/vtab1k/cifar10 --budget 100000 \\
      --supernet-epochs 50 --retrain-epochs 100 --search-epochs 20 --population 50 \\
      --out runs/cifar10-noah

  # GLoRA: per-layer forms of A..E, LoRA ranks 2 and 4
  vpeft search --method glora --model deit_tiny_patch16_224 --weights ... --data ... \\
      --budget 200000 --space rank=[2,4] --out runs/cifar10-glora

  # interrupted? run the same command again: finished stages are skipped, the rest continues
  # start again from scratch: add --overwrite

  vpeft eval --run runs/cifar10-noah    # the result is a normal run folder

--space (defaults: the paper's):
  noah   adapter / lora / prompt: sizes of a present module, a list or a largest size N for
         {1, N/2, N} (default {1, 5, 10}); depths: how many leading blocks hold a module type
         (default {L/4, L/2, 3L/4, L}, i.e. {3, 6, 9, 12} on 12 blocks)
  glora  rank: LoRA rank(s) of A, B and C (default 4); targets: Linear name patterns

Stages (--out RUN); the space and the budget are checked before stage 1 starts:
  1. RUN/supernet: the method's weight-sharing supernet trained on train800, a random subnet
     drawn before every step; an ordinary run folder that resumes.
  2. RUN/search.json: evolution over subnets whose trainable parameters (head excluded) are at
     most --budget, each scored by top-1 on val200 with the supernet's weights; the test split is
     never used. Holds the chosen subnet, its parameters, every candidate's score, the history.
  3. RUN: the chosen subnet retrained from scratch on train800val200 and evaluated once on
     test, as `vpeft train` would.
--epochs and the other training options apply to both training stages.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields

from vpeft.commands._common import add_dataclass_options, check_weights_file
from vpeft.engine.config import TrainConfig, coerce
from vpeft.engine.search_config import SearchConfig

HELP = "NOAH / GLoRA: train a supernet, search subnets under a parameter budget, retrain the best"
# options a search sets itself, per stage
_FIXED = ("method", "method_args", "val", "overwrite", "resume")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_options(p.add_argument_group("search options"), SearchConfig, ("train",))
    add_dataclass_options(p.add_argument_group("training options (both training stages)"),
                          TrainConfig, _FIXED)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """A :class:`SearchConfig` from the parsed flags (defaults where none was given)."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "_run")}
    names = {f.name for f in fields(SearchConfig)} - {"train"}
    hints = typing.get_type_hints(SearchConfig)
    own = {k: coerce(values.pop(k), hints[k], k) for k in list(values) if k in names}
    missing = [f"--{k}" for k in ("method", "budget") if k not in own]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    return SearchConfig(train=TrainConfig.from_dict({"method": own["method"], **values}), **own)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vpeft.engine.search import search  # heavy imports only when the command runs

    config = config_from_args(args)
    check_weights_file(config.train.weights)
    out = search(config)
    if PartialState().is_main_process:
        found, results = out["search"], out["results"]
        print(json.dumps({"method": found["method"], "choice": found["choice"],
                          "params": found["params"], "budget": found["budget"],
                          "val_top1": found["top1"], "split": results["split"],
                          "top1": results["top1"],
                          "trainable_params_no_head": results["trainable_params_no_head"]}))
    return 0
