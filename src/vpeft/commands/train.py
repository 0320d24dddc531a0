"""Train a PEFT method on a data set, then evaluate it once (the VTAB-1k protocol by default).

Examples:
  # LoRA on a VTAB-1k task with local DeiT-Tiny weights: train800val200 -> test
  vpeft train --model deit_tiny_patch16_224 \\
      --weights ../shared/weights/deit_tiny_patch16_224.fb_in1k.safetensors \\
      --data ../shared/data/vtab1k/cifar10 --method lora --method-args rank=8 \\
      --epochs 10 --batch-size 32 --lr 1e-3 --img-size 224 --seed 0 --out runs/cifar10-lora

  # choosing hyper-parameters: train on train800, evaluate on val200 (never on test)
  vpeft train ... --val --out runs/cifar10-lora-val

  # a linear probe at a lower resolution (position embeddings are resampled)
  vpeft train --model deit_tiny_patch16_224 --data DIR --method linear --img-size 112 --out runs/x

  # every option from YAML (the names below with underscores); flags override the file
  vpeft train --config run.yaml --lr 5e-4 --out runs/lr5e-4

  # continue an interrupted run with its saved settings
  vpeft train --resume --out runs/cifar10-lora

  # two processes: GPUs, or CPU processes over gloo on a machine without a GPU
  # (--batch-size stays the global batch; `accelerate launch --cpu` starts only one process)
  accelerate launch --multi_gpu --num_processes 2 -m vpeft.cli train --config run.yaml

Data (--data): a VTAB-1k task folder (<split>.txt list files + classes.txt), image folders
(<split>/<class>/*.png|jpg) or idx files (train-images-idx3-ubyte.gz ..., e.g. Fashion-MNIST).
The run folder (--out) receives the adapter (adapter.safetensors; vpeft.load reads it), config.yaml
(the resolved options; reusable with --config, which then ignores the `out:` it holds: pass a new
--out), classes.txt, metrics.jsonl (one line per epoch) and results.json (top-1, parameter counts,
time, memory). An existing run is never replaced unless --overwrite, and then only once the new run
has finished (it is written beside the old one). --resume of a finished run prints its results, or
refuses if other settings are given. Defaults follow the usual VTAB-1k recipe (100 epochs, batch
64, AdamW lr 1e-3, wd 1e-4, 10% warm-up, cosine); on a CPU pass far fewer epochs, and perhaps a
smaller --img-size.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from vpeft.commands._common import add_dataclass_options, check_weights_file
from vpeft.engine.config import TrainConfig, read_yaml

HELP = "train a method on a data set and evaluate it (writes a run folder)"
_NOT_OPTIONS = ("command", "verbose", "config", "_run")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                   help="read options from this YAML file (keys as below, e.g. batch_size: 32); "
                        "command-line flags override it")
    add_dataclass_options(p.add_argument_group("training options (also YAML keys)"), TrainConfig,
                          required_note=" (required, unless --config or --resume gives it)")


def _yaml_values(path: str) -> dict[str, Any]:
    """The options of a ``--config`` file. A run's own ``config.yaml`` names that run as ``out``;
    reusing it is for a *new* run, so that ``out`` is dropped (``--out`` gives the new folder)."""
    values = read_yaml(path)
    out = values.get("out")
    if out and Path(out).resolve() == Path(path).resolve().parent:
        values.pop("out")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < a resumed run's saved config < ``--config`` YAML < command-line flags.

    ``--resume`` of a *finished* run with settings other than its own raises, naming them.
    """
    from vpeft.engine.rundir import CONFIG_FILE, RunDir

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    yaml_values = _yaml_values(args.config) if getattr(args, "config", None) else {}
    values = {**yaml_values, **flags}
    out = values.get("out")
    if values.get("resume") and out and (RunDir(out).file(CONFIG_FILE)).is_file():
        saved = read_yaml(RunDir(out).file(CONFIG_FILE))
        if RunDir(out).status(overwrite=False, resume=True) == "complete":
            _check_unchanged(saved, values, RunDir(out).path)
        values = {**saved, **values}
    return TrainConfig.from_dict(values)


def _check_unchanged(saved: dict[str, Any], given: dict[str, Any], path: Path) -> None:
    """Raise if ``given`` options differ from a finished run's ``saved`` ones.

    Only what was given is compared, in the saved (resolved) form: paths absolute, and method /
    model options on top of the saved ones, since ``config.yaml`` lists every resolved default.
    """
    merged = dict(saved)
    for key, value in given.items():
        if isinstance(saved.get(key), dict) and isinstance(value, dict):
            merged[key] = {**saved[key], **value}
        elif key in ("data", "weights") and value:
            merged[key] = os.path.abspath(value)  # as the run saved it
        else:
            merged[key] = value
    diff = TrainConfig.from_dict(merged).differences(TrainConfig.from_dict(saved))
    if diff:
        raise ValueError(f"{path} is a finished run with other settings ({'; '.join(diff)}); "
                         "drop them to see its results, or choose another --out")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vpeft.engine import train  # heavy imports only when the command runs

    config = config_from_args(args)
    check_weights_file(config.weights)
    results = train(config)
    if PartialState().is_main_process:
        keys = ("method", "model", "split", "top1", "miou", "pixel_accuracy", "trainable_params",
                "train_seconds", "images_per_second")
        print(json.dumps({k: results[k] for k in keys if k in results}))
    return 0
