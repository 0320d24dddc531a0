"""Evaluation: top-1 of a model on a data set, and of a saved run on any split.

Every process evaluates its share of each batch; ``gather_for_metrics`` collects the logits in
data set order and drops the padding accelerate adds to the last batch, so each image counts
exactly once whatever the number of processes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import vpeft
from vpeft.data import data_config
from vpeft.engine.config import TrainConfig
from vpeft.engine.model import build_backbone
from vpeft.engine.rundir import RunDir
from vpeft.engine.runtime import (
    make_accelerator,
    make_loader,
    progress,
    resolve_precision,
    seed_everything,
)
from vpeft.tasks import Task, make_task

logger = logging.getLogger(__name__)

@dataclass
class EvalResult:
    """The task's scores (``top1``; or ``miou``, ``pixel_accuracy``, ``per_class_iou``), the
    mean loss, and for classification the predicted class of every image, in order."""

    metrics: dict[str, Any]
    loss: float
    images: int
    seconds: float
    predictions: torch.Tensor | None = None

    @property
    def top1(self) -> float | None:
        return self.metrics.get("top1")

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def deployed(model: nn.Module) -> nn.Module:
    """What evaluation runs: a merged copy of ``model`` when its method folds into the weights
    (the plain backbone's speed; the same function, up to rounding), else ``model`` itself."""
    state = vpeft.get_state(model, required=False)
    if state is None or state.merged is not None or not state.method.mergeable:
        return model
    return vpeft.merge(model)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator,
             show_progress: bool = True, desc: str = "eval", merge: bool = True,
             task: Task | None = None, size: int | None = None) -> EvalResult:
    """The ``task``'s scores (default: top-1 of image classification) of ``model`` on a loader
    prepared by ``accelerator``; every process gets them all. ``size`` is the side the model was
    trained at (segmentation's sliding windows).

    With ``merge`` a mergeable method is evaluated merged (a copy; ``model`` is left as it is).
    """
    task = task or make_task("image")
    model = deployed(accelerator.unwrap_model(model)) if merge else model
    model.eval()
    metric = task.metric(list(getattr(loader.dataset, "classes", None) or []))
    start = time.perf_counter()
    for images, labels in progress(loader, accelerator, show_progress, desc=desc):
        with accelerator.autocast():
            logits = task.infer(model, images, labels, size or images.shape[-1])
        metric.update(*accelerator.gather_for_metrics((logits.float().contiguous(), labels)))
    scores = metric.compute()
    loss, images, predictions = scores.pop("loss"), scores.pop("images"), \
        scores.pop("predictions", None)
    return EvalResult(metrics=scores, loss=loss, images=images,
                      seconds=time.perf_counter() - start, predictions=predictions)


# VTAB-1k splits and the splits whose images they contain
TRAINED_ON = {"train800val200": ("train800", "val200", "train800val200"),
              "train800": ("train800",)}


def load_run(run: str | Path, weights: str | None = None, data: str | None = None
             ) -> tuple[nn.Module, TrainConfig, list[str] | None]:
    """The model of run folder ``run`` (its backbone with its adapter loaded, on the CPU), its
    config and its class names. ``weights`` replaces the run's backbone weights file. ``run`` may
    also be a Hugging Face PEFT adapter folder (then ``data`` is needed)."""
    from vpeft.interop.peft_format import is_peft_folder, load_peft_run

    if is_peft_folder(run):
        return load_peft_run(run, data, weights)
    folder = RunDir(run)
    if not folder.file("config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a vpeft run folder (no config.yaml)")
    meta = vpeft.read_config(run)
    config = folder.read_config()
    seed_everything(config.seed)  # a random-init backbone (no pretrained weights) comes back too
    model = build_backbone(config.model, meta["base"]["num_classes"], weights or config.weights,
                           config.pretrained, config.img_size, config.model_args)
    make_task(config.task, **config.task_options()).build(model)  # e.g. a decoder for masks
    vpeft.load(model, run)
    return model, config, folder.read_classes()


def evaluate_run(run: str | Path, data: str | None = None, split: str | None = None,
                 batch_size: int | None = None, weights: str | None = None,
                 num_workers: int | None = None, cpu: bool = False,
                 show_progress: bool = True, predictions: bool = False) -> dict[str, Any]:
    """Evaluate the adapter saved in run folder ``run`` on ``split`` of ``data``.

    Defaults come from the run's ``config.yaml``: its data folder, its evaluation split, its
    backbone weights (``weights`` replaces them, e.g. on another machine). With ``predictions``
    the result also lists the predicted class of every image, in data set order.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or unset: the run's), got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (or unset), got {num_workers}")
    model, config, classes = load_run(run, weights, data)
    precision = config.precision if torch.cuda.is_available() and not cpu else "no"
    accelerator = make_accelerator(resolve_precision(precision, cpu), cpu=cpu)
    data = data or config.data
    split = split or config.splits[1]
    if os.path.abspath(data) == config.data and split in TRAINED_ON.get(config.splits[0], ()):
        logger.warning("the run trained on %s, which holds the images of %s: this accuracy is on "
                       "training data, not held-out data", config.splits[0], split)
    task = make_task(config.task, **config.task_options())
    dataset = task.open(data, split, classes=classes)
    dataset.transform = task.transforms(data_config(model, config.img_size))[1]
    if batch_size is None:
        batch_size = config.eval_batch_size or config.batch_size  # saved values are >= 1
    loader = make_loader(dataset, batch_size, num_workers)
    loader = accelerator.prepare(loader)
    model.to(accelerator.device)
    result = evaluate(task.wrap(model), loader, accelerator, show_progress, task=task,
                      size=config.img_size)
    logger.info("%s on %s/%s: %s %.2f%% (%d images)", config.method, data, split, task.score,
                result.metrics[task.score], result.images)
    out = {
        "run": str(run), "method": config.method, "model": config.model, "data": str(data),
        "split": split, **result.metrics, "loss": result.loss, "images": result.images,
        "seconds": result.seconds, "images_per_second": result.images_per_second,
        **task.result_fields(),
    }
    if predictions:
        if result.predictions is None:
            raise ValueError(f"{task.name} runs have no per-image predictions to list; "
                             "use `vpeft predict`")
        out["predictions"] = result.predictions.tolist()
    return out
