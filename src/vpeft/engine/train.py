"""The training loop: ``train(TrainConfig) -> results``.

:func:`train` reads top to bottom as the stages of a run, each a small function below it or, for
the head, in :mod:`vpeft.engine.head`: prepare the run folder -> open the data -> build and adapt
the model -> (train the head on cached features, or start it at the probe's solution) ->
optimiser (and resume) -> epochs (a checkpoint after each) -> save the adapter -> evaluate once
-> results. The same code runs on a CPU, one GPU or many (``accelerate launch``); ``batch_size``
is the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

import vpeft
from vpeft.data import data_config
from vpeft.engine.checkpoint import (
    STATE_NAME,
    load_training_state,
    restore_model,
    save_training_state,
    set_rng_state,
)
from vpeft.engine.config import TrainConfig
from vpeft.engine.evaluate import EvalResult, evaluate
from vpeft.engine.head import (
    eval_batch_size,
    fit_convex_head,
    head_from_probe,
    head_on_cached_features,
)
from vpeft.engine.model import build_backbone
from vpeft.engine.optim import build_optimizer
from vpeft.engine.probe import ProbeResult
from vpeft.engine.rundir import RunDir
from vpeft.engine.runtime import (
    make_accelerator,
    make_loader,
    peak_memory_mb,
    progress,
    reset_peak_memory,
    resolve_precision,
    seed_everything,
    set_epoch,
)
from vpeft.registry import get_method
from vpeft.tasks import Task, make_task

logger = logging.getLogger(__name__)


def resolve(config: TrainConfig, img_size: int, precision: str) -> TrainConfig:
    """The config with everything the run decided filled in: absolute paths, the image size,
    every method option, the splits, the precision. This is what ``config.yaml`` holds."""
    method = get_method(config.method).name
    train_split, eval_split = config.splits
    return dataclasses.replace(
        config,
        method=method,
        method_args=vpeft.make_config(method, **config.method_args).to_dict(),
        data=os.path.abspath(config.data),
        weights=os.path.abspath(config.weights) if config.weights else None,
        img_size=img_size,
        train_split=train_split,
        eval_split=eval_split,
        precision=precision,
    )


def train(config: TrainConfig,
          before_step: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Train ``config.method`` on ``config.data``, evaluate once, write the run folder.

    Returns what ``results.json`` holds. An existing run in ``config.out`` raises unless
    ``overwrite`` or ``resume`` is set. ``before_step(model)``, when given, is called with the
    adapted model before every forward pass and optimiser step, e.g. to draw a random subnet of
    a unified method's supernet (``vpeft search``); it must act the same on every process.
    """
    run = prepare_run(config)
    if run.status == "complete":
        run.log("%s is complete; its results are in %s", run.folder.path,
                run.folder.file("results.json"))
        return run.folder.read_results()
    seed_everything(config.seed)
    train_set, eval_set = open_data(run, config)
    model, config = build_model(run, config, train_set, eval_set)
    start_run_folder(run, config, train_set, eval_set)

    reset_peak_memory()
    model.to(run.accelerator.device)
    task_net = run.task.wrap(model)  # what a batch of the task runs through (shares model's)
    start = time.perf_counter()
    net, train_data, cache = head_on_cached_features(run, config, task_net, train_set)
    probe = fit_convex_head(run, config, net, train_data) if cache != "none" else None
    start_head = head_from_probe(run, config, model, train_set) if cache == "none" else None
    prep_seconds = time.perf_counter() - start  # feature extraction counts as training time
    loop = make_optimiser(run, config, model, net, train_data, cached=cache != "none")
    loop.seconds += prep_seconds
    if probe is not None:  # the head is fitted to convergence: nothing left for the epochs
        loop.first_epoch, loop.history = config.epochs, [probe.record()]
        if run.main:
            run.folder.write_metrics(loop.history)
    elif start_head is not None and not loop.history:  # LP-FT: the probe is "epoch 0"
        loop.history = [start_head.record()]
    run_epochs(run, config, model, loop, before_step)

    if run.main:
        vpeft.save(model, run.folder.path, overwrite=True)
    result = evaluate_once(run, config, task_net, eval_set)
    results = results_of(run, config, model, loop, result, len(train_set), cache,
                         probe or start_head)
    finish_run(run, config, results)
    return results


@dataclass
class Run:
    """Where a run executes and writes: its accelerator and folder, and what the folder holds."""

    accelerator: Accelerator
    folder: RunDir
    status: str  # new | resume | complete (RunDir.status)
    saved: TrainConfig | None  # the config of the run being resumed
    precision: str  # what the run really uses (resolve_precision)
    task: Task  # image | video: data, what runs on a batch, loss, result fields

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, *args: Any) -> None:
        """Log once: at info level on the main process, at debug level on the others."""
        (logger.info if self.main else logger.debug)(*args)


@dataclass
class Loop:
    """The moving parts of the epochs: what trains, its optimiser, schedule, data and history."""

    net: nn.Module  # the model, or the head on cached features (accelerate-prepared)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    steps_per_epoch: int
    first_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time so far, including the runs before a resume


def prepare_run(config: TrainConfig) -> Run:
    """The accelerator and the run folder's status; the saved config when resuming."""
    precision = resolve_precision(config.precision, config.cpu)
    accelerator = make_accelerator(precision, config.cpu)
    folder = RunDir(config.out)
    status = folder.status(config.overwrite, config.resume)
    saved = folder.read_config() if status == "resume" else None
    task = make_task(config.task, **config.task_options())
    return Run(accelerator, folder, status, saved, precision, task)


def open_data(run: Run, config: TrainConfig) -> tuple[Any, Any]:
    """The training and evaluation sets (the evaluation set uses the training set's classes)."""
    train_split, eval_split = config.splits
    train_set = run.task.open(config.data, train_split, train=True, seed=config.seed)
    return train_set, run.task.open(config.data, eval_split, classes=train_set.classes)


def build_model(run: Run, config: TrainConfig, train_set: Any,
                eval_set: Any) -> tuple[nn.Module, TrainConfig]:
    """The adapted backbone, and the resolved config (checked against the resumed run's)."""
    model = build_backbone(config.model, train_set.num_classes, config.weights, config.pretrained,
                           config.img_size, config.model_args)
    run.task.build(model)  # e.g. a segmentation decoder in the head's place
    dcfg = data_config(model, config.img_size)
    vpeft.adapt(model, config.method, **config.method_args)
    config = resolve(config, dcfg["input_size"][-1], run.precision)
    if run.saved is not None and (diff := config.differences(run.saved)):
        raise ValueError(f"cannot resume {run.folder.path} with other settings:\n  "
                         + "\n  ".join(diff))
    train_set.transform, eval_set.transform = run.task.transforms(dcfg, config.seed)
    train_set.hflip_seed = config.seed if config.hflip else None
    return model, config


def start_run_folder(run: Run, config: TrainConfig, train_set: Any, eval_set: Any) -> None:
    """Check the batch sizes, then (a new run, main process) write config and classes."""
    processes = run.accelerator.num_processes
    for b in (config.batch_size, eval_batch_size(config)):
        if b % processes:
            raise ValueError(f"batch size {b} must be a multiple of the {processes} processes "
                             "(each takes an equal share of every batch)")
    if len(train_set) < config.batch_size:
        raise ValueError(f"batch size {config.batch_size} is larger than the {len(train_set)} "
                         "training images")
    run.accelerator.wait_for_everyone()  # every process has checked the folder before it changes
    if run.main and run.status == "new":
        run.folder.start()  # over an old run (--overwrite): staged beside it until finish()
        run.folder.write_config(config)
        run.folder.write_classes(train_set.classes)
    run.log("training %s on %s (%d images, %s) -> %s (%d) with %s, %d process(es), precision %s",
            config.model, config.train_split, len(train_set), train_set.layout,
            config.eval_split, len(eval_set), config.method, processes, run.precision)


def make_optimiser(run: Run, config: TrainConfig, model: nn.Module, net: nn.Module,
                   train_data: Any, cached: bool) -> Loop:
    """AdamW with warm-up and cosine decay, the shuffled loader, and (``--resume``) the state of
    the interrupted run: tensors, optimiser, schedule, RNGs, scaler, history."""
    steps_per_epoch = len(train_data) // config.batch_size
    optimizer, scheduler = build_optimizer(
        model, config.lr, config.weight_decay, vpeft.get_state(model).method.no_decay,
        steps_per_epoch * config.epochs, config.warmup_ratio)
    loop = Loop(net, optimizer, scheduler, None, steps_per_epoch)
    state = None
    if run.status == "resume" and run.folder.file(STATE_NAME).is_file():
        state = load_training_state(run.folder.file(STATE_NAME))
        restore_model(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loop.first_epoch, loop.history = state["epoch"], state["extra"]["history"]
        loop.seconds = state["extra"]["seconds"]
        run.log("resuming %s after epoch %d of %d", run.folder.path, loop.first_epoch,
                config.epochs)
    workers = 0 if cached else config.num_workers  # cached tensors need no loader processes
    loader = make_loader(train_data, config.batch_size, workers, shuffle_seed=config.seed,
                         persistent=not config.hflip)  # flips change with the epoch
    loop.net, loop.optimizer, loop.loader = run.accelerator.prepare(net, optimizer, loader)
    if state is not None:
        set_rng_state(state["rng"])
        scaler = run.accelerator.scaler
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
    return loop


def run_epochs(run: Run, config: TrainConfig, model: nn.Module, loop: Loop,
               before_step: Callable[[nn.Module], None] | None) -> None:
    """The remaining epochs; after each, the metrics and (last) the state ``--resume`` reads."""
    for epoch in range(loop.first_epoch, config.epochs):
        tic = time.perf_counter()
        loss, top1, images, lr = train_one_epoch(run, config, model, loop, epoch, before_step)
        elapsed = time.perf_counter() - tic
        loop.seconds += elapsed
        loop.history.append({"epoch": epoch + 1, "loss": loss, "train_top1": top1, "lr": lr,
                             "seconds": round(elapsed, 3), "images": images})
        if run.main:  # the state file is written last: it is what --resume continues from
            run.folder.write_metrics(loop.history)
            save_training_state(run.folder.file(STATE_NAME), model, loop.optimizer,
                                loop.scheduler, run.accelerator.scaler, epoch + 1,
                                {"history": loop.history, "seconds": loop.seconds})
        run.log("epoch %d/%d  loss %.4f  train top-1 %.2f%%  lr %.2e  %.1fs", epoch + 1,
                config.epochs, loss, top1, lr, elapsed)
        run.accelerator.wait_for_everyone()


def train_one_epoch(run: Run, config: TrainConfig, model: nn.Module, loop: Loop, epoch: int,
                    before_step: Callable[[nn.Module], None] | None
                    ) -> tuple[float, float, int, float]:
    """One pass over the data: ``(mean loss, train top-1 %, images, last lr)`` over processes."""
    accelerator, net, optimizer = run.accelerator, loop.net, loop.optimizer
    set_epoch(loop.loader, epoch)  # data order (and flips) from (seed, epoch)
    net.train()
    totals = torch.zeros(4, device=accelerator.device)  # loss sum, correct, counted, images
    bar = progress(loop.loader, accelerator, config.progress,
                   desc=f"epoch {epoch + 1}/{config.epochs}")
    lr = optimizer.param_groups[0]["lr"]
    for images, labels in bar:
        if before_step is not None:
            before_step(model)
        logits = net(images)
        loss = run.task.loss(logits, labels, config.label_smoothing)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        loop.scheduler.step()  # per step: warm-up then cosine
        optimizer.zero_grad(set_to_none=True)
        n = totals.new_tensor(len(labels))
        correct, counted = run.task.correct(logits, labels)  # tensors: no wait for the GPU
        totals += torch.stack([loss.detach().float() * n, correct.float(), counted.float(), n])
        if not bar.disable:  # .item() waits for the GPU: only when someone watches
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
    loss_sum, correct, counted, count = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / count, 100.0 * correct / max(counted, 1), int(count), lr


def evaluate_once(run: Run, config: TrainConfig, model: nn.Module, eval_set: Any) -> EvalResult:
    """The task's scores and loss of the trained model on the evaluation split (the only
    evaluation)."""
    loader = make_loader(eval_set, eval_batch_size(config), config.num_workers)
    return evaluate(model, run.accelerator.prepare(loader), run.accelerator, config.progress,
                    task=run.task, size=config.img_size)


def finish_run(run: Run, config: TrainConfig, results: dict[str, Any]) -> None:
    """Write ``results.json`` and drop the resume state: the run is complete."""
    if run.main:
        run.folder.write_results(results)
        run.folder.file(STATE_NAME).unlink(missing_ok=True)
        run.folder.finish()
    run.log("%s on %s: %s %.2f%% on %s (%d images); %.1fs training, %.1f images/s",
            config.method, config.data, run.task.score, results[run.task.score], config.eval_split,
            results["eval_images"], results["train_seconds"], results["images_per_second"])
    run.accelerator.wait_for_everyone()


def results_of(run: Run, config: TrainConfig, model: nn.Module, loop: Loop, result: EvalResult,
               train_images: int, cache: str, probe: ProbeResult | None) -> dict[str, Any]:
    """What ``results.json`` holds: the run's settings, accuracy, parameter counts, speed."""
    summary = vpeft.summary(model)
    seen = sum(r["images"] for r in loop.history)
    memory, memory_kind = peak_memory_mb(run.accelerator.device)
    return {
        "method": config.method, "model": config.model, "data": config.data,
        "train_split": config.train_split, "split": config.eval_split, **result.metrics,
        "metric": run.task.score,
        "eval_loss": result.loss, "eval_images": result.images, "train_images": train_images,
        "epochs": config.epochs, "steps": loop.steps_per_epoch * config.epochs,
        "img_size": config.img_size, "batch_size": config.batch_size, "lr": config.lr,
        "seed": config.seed, "trainable_params": summary.trainable,
        "trainable_params_no_head": summary.trainable_no_head,
        "total_params": summary.total, "train_seconds": loop.seconds,
        "images_per_second": seen / max(loop.seconds, 1e-9),
        "eval_seconds": result.seconds, "eval_images_per_second": result.images_per_second,
        "peak_memory_mb": memory, "peak_memory_kind": memory_kind, "feature_cache": cache,
        "processes": run.accelerator.num_processes, "device": str(run.accelerator.device),
        "precision": run.precision, "head_init": config.head_init,
        "probe": probe.to_dict() if probe is not None else None,
        **run.task.result_fields(),
        "versions": {"vpeft": vpeft.__version__, "torch": torch.__version__,
                     "timm": __import__("timm").__version__},
    }
