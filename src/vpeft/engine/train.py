"""The training loop: ``train(TrainConfig) -> results``.

Read top to bottom: run folder -> data -> backbone -> method -> (feature cache) -> optimizer ->
epochs (a checkpoint after each) -> adapter -> one evaluation -> results. The same code runs on a
CPU, one GPU or many (``accelerate launch``); ``batch_size`` is the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.data import data_config, eval_transform, open_dataset
from vpeft.engine.checkpoint import (
    STATE_NAME,
    load_training_state,
    restore_model,
    save_training_state,
    set_rng_state,
)
from vpeft.engine.config import TrainConfig
from vpeft.engine.evaluate import evaluate
from vpeft.engine.features import CachedHead, cache_kind, extract_features, trainable_heads
from vpeft.engine.model import build_backbone
from vpeft.engine.optim import build_optimizer
from vpeft.engine.probe import fit_probe
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
    a NOAH supernet (``vpeft search``); it must act the same on every process.
    """
    precision = resolve_precision(config.precision, config.cpu)
    accelerator = make_accelerator(precision, config.cpu)
    main = accelerator.is_main_process
    log = logger.info if main else logger.debug
    run = RunDir(config.out)
    status = run.status(config.overwrite, config.resume)
    if status == "complete":
        log("%s is complete; its results are in %s", run.path, run.file("results.json"))
        return run.read_results()
    saved = run.read_config() if status == "resume" else None

    # -- data, backbone, method -------------------------------------------------------------------
    seed_everything(config.seed)
    train_split, eval_split = config.splits
    train_set = open_dataset(config.data, train_split)
    eval_set = open_dataset(config.data, eval_split, classes=train_set.classes)
    model = build_backbone(config.model, train_set.num_classes, config.weights, config.pretrained,
                            config.img_size, config.model_args)
    dcfg = data_config(model, config.img_size)
    vpeft.adapt(model, config.method, **config.method_args)
    config = resolve(config, dcfg["input_size"][-1], precision)
    if saved is not None and (diff := config.differences(saved)):
        raise ValueError(f"cannot resume {run.path} with other settings:\n  " + "\n  ".join(diff))
    train_set.transform = eval_set.transform = eval_transform(dcfg)
    train_set.hflip_seed = config.seed if config.hflip else None
    batch, eval_batch = config.batch_size, config.eval_batch_size or config.batch_size
    for b in (batch, eval_batch):
        if b % accelerator.num_processes:
            raise ValueError(f"batch size {b} must be a multiple of the {accelerator.num_processes}"
                             " processes (each takes an equal share of every batch)")
    if len(train_set) < batch:
        raise ValueError(f"batch size {batch} is larger than the {len(train_set)} training images")
    accelerator.wait_for_everyone()  # every process has checked the folder before it changes
    if main and status == "new":
        run.clear()
        run.write_config(config)
        run.write_classes(train_set.classes)
    log("training %s on %s (%d images, %s) -> %s (%d) with %s, %d process(es), precision %s",
        config.model, train_split, len(train_set), train_set.layout, eval_split, len(eval_set),
        config.method, accelerator.num_processes, precision)

    # -- what trains: the model, or only its head on cached backbone features ---------------------
    reset_peak_memory()
    model.to(accelerator.device)
    start = time.perf_counter()
    heads = trainable_heads(model) if config.cache_features and not config.hflip else None
    if heads:
        probe = torch.stack([train_set[i][0] for i in range(min(4, len(train_set)))])
        cache = cache_kind(model, heads, probe.to(accelerator.device))
        loader = accelerator.prepare(make_loader(train_set, eval_batch, config.num_workers))
        train_data = extract_features(model, loader, accelerator, cache, config.progress)
        net = CachedHead(model, heads, cache)
        log("only the head trains: training it on cached %s features", cache)
    else:
        cache, train_data, net = "none", train_set, model
    probe = None
    if heads and config.head_solver == "lbfgs":  # convex: fit it to convergence, no epochs
        probe = fit_probe(net, *train_data.tensors, config.seed, accelerator.device)
        log("probe: l2 %.0e by %d-fold CV, %d L-BFGS iterations, train loss %.4f", probe.l2,
            probe.folds, probe.iterations, probe.train_loss)
    seconds = time.perf_counter() - start  # feature extraction counts as training time

    steps_per_epoch = len(train_data) // batch
    optimizer, scheduler = build_optimizer(
        model, config.lr, config.weight_decay, vpeft.get_state(model).method.no_decay,
        steps_per_epoch * config.epochs, config.warmup_ratio)
    first_epoch, history, state = 0, [], None
    if probe is not None:  # nothing left for the epochs to do
        first_epoch, history = config.epochs, [probe.record()]
        if main:
            run.write_metrics(history)
    if status == "resume" and run.file(STATE_NAME).is_file():
        state = load_training_state(run.file(STATE_NAME))
        restore_model(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, history = state["epoch"], state["extra"]["history"]
        seconds += state["extra"]["seconds"]
        log("resuming %s after epoch %d of %d", run.path, first_epoch, config.epochs)
    workers = 0 if heads else config.num_workers  # cached tensors need no loader processes
    loader = make_loader(train_data, batch, workers, shuffle_seed=config.seed,
                         persistent=not config.hflip)  # flips change with the epoch
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    if state is not None:
        set_rng_state(state["rng"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])

    # -- the loop ---------------------------------------------------------------------------------
    for epoch in range(first_epoch, config.epochs):
        set_epoch(loader, epoch)  # data order (and flips) from (seed, epoch)
        net.train()
        tic = time.perf_counter()
        totals = torch.zeros(3, device=accelerator.device)  # loss sum, correct, images
        bar = progress(loader, accelerator, config.progress,
                       desc=f"epoch {epoch + 1}/{config.epochs}")
        for images, labels in bar:
            if before_step is not None:
                before_step(model)
            logits = net(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()  # per step: warm-up then cosine
            optimizer.zero_grad(set_to_none=True)
            n = labels.new_tensor(len(labels))
            totals += torch.stack([loss.detach().float() * n, (logits.argmax(-1) == labels).sum(),
                                   n]).float()
            if not bar.disable:  # .item() waits for the GPU: only when someone watches
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
        loss_sum, correct, count = accelerator.reduce(totals, "sum").tolist()
        elapsed = time.perf_counter() - tic
        seconds += elapsed
        history.append({"epoch": epoch + 1, "loss": loss_sum / count,
                        "train_top1": 100.0 * correct / count, "lr": lr,
                        "seconds": round(elapsed, 3), "images": int(count)})
        if main:  # the state file is written last: it is what --resume continues from
            run.write_metrics(history)
            save_training_state(run.file(STATE_NAME), model, optimizer, scheduler,
                                accelerator.scaler, epoch + 1,
                                {"history": history, "seconds": seconds})
        log("epoch %d/%d  loss %.4f  train top-1 %.2f%%  lr %.2e  %.1fs", epoch + 1,
            config.epochs, loss_sum / count, 100.0 * correct / count, lr, elapsed)
        accelerator.wait_for_everyone()

    # -- save, evaluate once, report --------------------------------------------------------------
    if main:
        vpeft.save(model, run.path, overwrite=True)
    eval_loader = accelerator.prepare(make_loader(eval_set, eval_batch, config.num_workers))
    result = evaluate(model, eval_loader, accelerator, config.progress)
    summary = vpeft.summary(model)
    train_images = sum(r["images"] for r in history)
    memory, memory_kind = peak_memory_mb(accelerator.device)
    results = {
        "method": config.method, "model": config.model, "data": config.data,
        "train_split": train_split, "split": eval_split, "top1": result.top1,
        "eval_loss": result.loss, "eval_images": result.images, "train_images": len(train_set),
        "epochs": config.epochs, "steps": steps_per_epoch * config.epochs,
        "img_size": config.img_size, "batch_size": batch, "lr": config.lr, "seed": config.seed,
        "trainable_params": summary.trainable,
        "trainable_params_no_head": summary.trainable_no_head,
        "total_params": summary.total, "train_seconds": seconds,
        "images_per_second": train_images / max(seconds, 1e-9),
        "eval_seconds": result.seconds, "eval_images_per_second": result.images_per_second,
        "peak_memory_mb": memory, "peak_memory_kind": memory_kind, "feature_cache": cache,
        "processes": accelerator.num_processes, "device": str(accelerator.device),
        "precision": precision, "probe": probe.to_dict() if probe is not None else None,
        "versions": {"vpeft": vpeft.__version__, "torch": torch.__version__,
                     "timm": __import__("timm").__version__},
    }
    if main:
        run.write_results(results)
        run.file(STATE_NAME).unlink(missing_ok=True)
    log("%s on %s: top-1 %.2f%% on %s (%d images); %.1fs training, %.1f images/s", config.method,
        config.data, result.top1, eval_split, result.images, seconds, results["images_per_second"])
    accelerator.wait_for_everyone()
    return results
