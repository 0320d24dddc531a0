"""The head stages of a training run (:func:`vpeft.engine.train.train` calls them in order):
train the head on cached features when only the head trains, fit it to convergence (the linear
probe), or start a fine-tuning run at the probe's solution (LP-FT)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vpeft.backbones.base import get_view
from vpeft.engine.config import TrainConfig
from vpeft.engine.features import (
    CachedHead,
    cache_kind,
    extract_features,
    only_heads_train,
    trainable_heads,
)
from vpeft.engine.probe import ProbeResult, fit_probe
from vpeft.engine.runtime import make_loader

if TYPE_CHECKING:
    from vpeft.engine.train import Run


def eval_batch_size(config: TrainConfig) -> int:
    return config.batch_size if config.eval_batch_size is None else config.eval_batch_size


def head_on_cached_features(run: Run, config: TrainConfig, model: nn.Module,
                            train_set: Any) -> tuple[nn.Module, Any, str]:
    """What trains, on what: ``(net, data, cache kind)``.

    When only the head trains (and no augmentation changes the images), the frozen backbone runs
    once over the training set and the head trains on its cached features: ``(CachedHead, feature
    set, kind)``. Otherwise ``(model, train_set, "none")``.
    """
    cacheable = config.cache_features and not config.hflip and run.task.caches_features
    heads = trainable_heads(model) if cacheable else None
    if not heads:
        return model, train_set, "none"
    net, features = cached_features(run, config, model, heads, train_set)
    run.log("only the head trains: training it on cached %s features", net.kind)
    return net, features, net.kind


def cached_features(run: Run, config: TrainConfig, model: nn.Module, heads: list[str],
                    train_set: Any) -> tuple[CachedHead, Any]:
    """The model run once, in eval mode, over the training set: the head on its cached
    features, and those features."""
    probe = torch.stack([train_set[i][0] for i in range(min(4, len(train_set)))])
    cache = cache_kind(model, heads, probe.to(run.accelerator.device))
    loader = run.accelerator.prepare(
        make_loader(train_set, eval_batch_size(config), config.num_workers))
    features = extract_features(model, loader, run.accelerator, cache, config.progress)
    return CachedHead(model, heads, cache), features


def fit_convex_head(run: Run, config: TrainConfig, net: nn.Module,
                    features: Any) -> ProbeResult | None:
    """With ``head_solver='lbfgs'``, fit the head on the cached features to convergence (an
    L2-regularised logistic regression, L2 chosen by cross-validation on the training set)."""
    if config.head_solver != "lbfgs":
        return None
    probe = fit_probe(net, *features.tensors, config.seed, run.accelerator.device)
    run.log("probe: l2 %.0e by %d-fold CV, %d L-BFGS iterations, train loss %.4f", probe.l2,
            probe.folds, probe.iterations, probe.train_loss)
    return probe


def head_from_probe(run: Run, config: TrainConfig, model: nn.Module,
                    train_set: Any) -> ProbeResult | None:
    """With ``head_init='probe'`` (LP-FT, Kumar et al., ICLR 2022), the head starts at the linear
    probe's solution on the starting model's features, fitted as ``head_solver='lbfgs'`` fits it,
    instead of at a random init whose large early gradients distort the pre-trained features
    (and which few epochs leave far from trained). A resumed run skips it: its head (and every
    other tensor, the RNGs included) comes back from the checkpoint, and fitting a probe on the
    partly trained backbone would both waste the time and draw from the restored RNGs."""
    if config.head_init != "probe" or run.status == "resume":
        return None
    if not run.task.caches_features:
        raise ValueError(f"head_init=probe fits a linear probe on pooled features; the "
                         f"{run.task.name} task's head does not read them (use --head-init random)")
    heads = get_view(model).heads
    if not heads:
        raise ValueError(f"head_init=probe needs a classifier head, and the view of {config.model} "
                         "finds none")
    with only_heads_train(model, heads):
        net, features = cached_features(run, config, model, heads, train_set)
        run.log("head_init=probe: fitting the head on cached %s features first", net.kind)
        return fit_convex_head(run, dataclasses.replace(config, head_solver="lbfgs"), net,
                               features)
