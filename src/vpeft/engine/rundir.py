"""The run folder: what a run writes, and the rule that an existing run is never silently replaced.

```
runs/cifar10-lora/
  config.yaml               resolved TrainConfig (loads back with --config)
  classes.txt               the class names, line i = label i
  adapter.safetensors       trained / added tensors and the head (vpeft.save; vpeft.load reads it)
  adapter_config.json
  README.md                 model card: base, method, parameters, data and metrics, command
  metrics.jsonl             one line per epoch: epoch, loss, train_top1, lr, seconds, images
  results.json              method, model, data, split, top1, parameter counts, speed, memory, seed
  train_state.pt            while training: what --resume needs (removed when the run completes)
```

``--overwrite`` never deletes the old run before the new one has finished: the new run is written
into ``.<name>.overwrite/`` beside it and moved in file by file at the end (:meth:`RunDir.start`,
:meth:`RunDir.finish`); if it fails, the old run is still there, untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from vpeft.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text
from vpeft.engine.checkpoint import STATE_NAME
from vpeft.engine.config import TrainConfig
from vpeft.interop.card import write_card

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CLASSES_FILE = "classes.txt"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, STATE_NAME, WEIGHTS_NAME, CONFIG_NAME,
             CLASSES_FILE)


class RunDir:
    """A run folder; only the main process writes to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.final: Path | None = None  # while a replacement is staged: the folder it replaces

    def file(self, name: str) -> Path:
        return self.path / name

    def has_run(self) -> bool:
        return any(self.file(n).exists() for n in RUN_FILES)

    def status(self, overwrite: bool, resume: bool) -> str:
        """What to do with the folder: ``new``, ``resume`` or ``complete`` (read-only check).

        An existing run raises unless ``overwrite`` (start again) or ``resume`` (continue it; a
        complete run is left as it is). ``resume`` without a run starts one, so a job script can
        always pass it.
        """
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder")
        if not self.has_run():
            if resume:
                logger.info("nothing to resume in %s: starting a new run", self.path)
            return "new"
        if overwrite:
            return "new"
        if resume:
            if self.file(RESULTS_FILE).is_file() and not self.file(STATE_NAME).exists():
                return "complete"
            if not self.file(CONFIG_FILE).is_file():
                raise FileNotFoundError(f"cannot resume {self.path}: {CONFIG_FILE} is missing")
            return "resume"
        raise FileExistsError(
            f"{self.path} already holds a run; pass --overwrite to replace it or --resume to "
            "continue it (or choose another --out)"
        )

    def start(self) -> None:
        """Prepare for writing a new run. Over an existing run (``--overwrite``) the new one is
        written into a staging folder in the same parent (so the final moves are renames on one
        file system); :attr:`path` points there until :meth:`finish`."""
        if not self.has_run():
            return
        staging = self.path.parent / f".{self.path.name}.overwrite"
        shutil.rmtree(staging, ignore_errors=True)  # a replacement that never finished
        staging.mkdir()
        self.final, self.path = self.path, staging

    def finish(self) -> None:
        """Move a staged replacement into place: every file it wrote replaces the old one, and old
        run files it did not write go; files of the user's in the folder stay."""
        if self.final is None:
            return
        written = {p.name for p in self.path.iterdir()}
        for name in RUN_FILES:
            if name not in written:
                (self.final / name).unlink(missing_ok=True)
        for name in written:
            os.replace(self.path / name, self.final / name)
        self.path.rmdir()
        self.path, self.final = self.final, None

    def read_config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.file(CONFIG_FILE))

    def write_config(self, config: TrainConfig) -> None:
        atomic_write_text(self.file(CONFIG_FILE), config.to_yaml())

    def write_classes(self, classes: list[str]) -> None:
        atomic_write_text(self.file(CLASSES_FILE), "".join(c + "\n" for c in classes))

    def read_classes(self) -> list[str] | None:
        path = self.file(CLASSES_FILE)
        return path.read_text().splitlines() if path.is_file() else None

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` with one line per finished epoch (atomic, so a resumed run
        never has a line for an epoch it will run again)."""
        atomic_write_text(self.file(METRICS_FILE), "".join(json.dumps(r) + "\n" for r in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.file(RESULTS_FILE), json.dumps(results, indent=2) + "\n")
        if self.file(CONFIG_NAME).is_file():  # the adapter's model card gets data and metrics
            write_card(self.path)

    def read_results(self) -> dict[str, Any]:
        return json.loads(self.file(RESULTS_FILE).read_text())


METRIC_NAMES = {"top1": "Top-1", "miou": "mIoU"}  # how reports name a task's score


def result_score(results: dict[str, Any]) -> tuple[str, float]:
    """``(metric, value)`` of a ``results.json``: the task's score (``metric`` names it; runs
    written before it existed are classification, top-1)."""
    metric = results.get("metric") or "top1"
    if metric not in results:
        raise ValueError(f"results name {metric!r} as their score but do not hold it")
    return metric, float(results[metric])
