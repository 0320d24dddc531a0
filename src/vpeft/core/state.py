"""Adapting a model: ``adapt``, ``merge``, ``unmerge`` and ``summary``.

``adapt`` changes the model in place and records what it did in ``model.vpeft_state`` (an
:class:`AdapterState`), which ``save``/``merge``/``summary`` read.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vpeft.backbones.base import BackboneView, get_view
from vpeft.core.config import MethodConfig
from vpeft.core.conv import freeze_norm_stats
from vpeft.core.forward_check import check_forward_path
from vpeft.core.method import Method
from vpeft.core.surgery import Wrapper, folds_add_bias, follow_base, freeze, mark_trainable
from vpeft.registry import get_method, make_config

STATE_ATTR = "vpeft_state"


@dataclass
class AdapterState:
    """What vpeft did to a model: the method, its config, the base's identity, what was added."""

    method: Method
    config: MethodConfig
    base: dict[str, Any]
    added_keys: set[str] = field(default_factory=set)
    head_keys: set[str] = field(default_factory=set)
    merged: dict[str, Wrapper] | None = None  # wrappers taken out by merge(), for unmerge()
    shares_base: bool = False  # a task of a MultiTaskModel: its frozen tensors are shared
    # the module tree as adapt() found it (no tensor copied) and copies of the head's tensors,
    # which training changes in place: what vpeft.disable_adapter() computes with
    before: Rollback | None = field(default=None, repr=False)
    base_head: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _check_inplace(state: AdapterState, inplace: bool, what: str) -> None:
    if inplace and state.shares_base:
        raise ValueError(
            f"cannot {what} in place: this task shares its frozen weights with the other tasks "
            f"of a MultiTaskModel; use vpeft.{what}(model) for a standalone copy"
        )


def get_state(model: nn.Module, required: bool = True) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise ValueError(
            f"this {type(model).__name__} has not been adapted by vpeft; call vpeft.adapt() first"
        )
    return state


def head_state_keys(model: nn.Module, heads: list[str]) -> set[str]:
    return {k for h in heads for k in model.get_submodule(h).state_dict(prefix=h + ".")}


def base_identity(model: nn.Module) -> dict[str, Any]:
    """Architecture name, class count and a hash of the backbone's tensor names and shapes."""
    head_keys = head_state_keys(model, get_view(model).heads)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shapes = sorted(
        (k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in head_keys
    )
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return {
        "architecture": cfg.get("architecture") or type(model).__name__,
        "class": type(model).__name__,
        "num_classes": getattr(model, "num_classes", None),
        "shape_hash": digest,
    }


class Rollback:
    """What ``apply`` may change in a model, recorded without copying a tensor, so that a failed
    :func:`adapt` (or :func:`vpeft.load`) leaves the model exactly as it was.

    Methods change a model by composition: they replace sub-modules, add parameters, buffers and
    hooks, set attributes and flip ``requires_grad``. The first four live in each module's
    ``__dict__`` (``_modules``, ``_parameters``, ``_forward_pre_hooks`` ...), so a shallow copy of
    every module's ``__dict__`` and of the containers in it, plus every parameter's flag, undoes
    them all. Base tensors are never written in place by ``apply`` (only ``merge`` does that).
    """

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modules = [(m, {k: _shallow(v) for k, v in m.__dict__.items()})
                        for m in model.modules()]

    def restore(self) -> None:
        for module, saved in self.modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _shallow(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (dict, set, list)) else value


def check_module(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is a torch module (a timm model, say)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"vpeft needs a torch.nn.Module (e.g. a timm model), got {type(model).__name__} "
            f"{model!r:.60}"
        )


def adapt(model: nn.Module, method: str | MethodConfig, **options: Any) -> nn.Module:
    """Adapt ``model`` in place with a PEFT ``method`` and return it.

    ``method`` is a registered name (``"lora"``) with its options as keywords, or a config object
    (``vpeft.LoRAConfig(rank=8)``). Everything but the method's own parameters (and the classifier
    head, unless ``train_head=False``) is frozen. Validation comes first, and if the method fails
    to apply (a missing part, a target that matches nothing) the model is restored as it was.
    """
    check_module(model)
    if get_state(model, required=False) is not None:
        raise ValueError(
            "model is already adapted with "
            f"'{get_state(model).config.method}'; adapt a fresh base model instead"
        )
    config = make_config(method, **options)
    impl = get_method(config.method)(config)
    view = get_view(model)
    base = base_identity(model)
    base_tensors = {id(t) for t in model.state_dict(keep_vars=True).values()}
    heads = head_state_keys(model, view.heads) if config.train_head else set()
    base_head = {k: v.detach().clone() for k, v in model.state_dict().items() if k in heads}
    rollback = Rollback(model)
    try:
        _apply(model, impl, view, base_tensors)
    except BaseException:
        rollback.restore()
        raise
    current = model.state_dict(keep_vars=True)
    added = {k for k, t in current.items() if id(t) not in base_tensors}
    # head names as they are now (a method may wrap the head)
    head_now = {k for k in current if view.in_head(k)}
    model.__dict__[STATE_ATTR] = AdapterState(impl, config, base, added, head_now,
                                              before=rollback, base_head=base_head)
    return model


def _apply(model: nn.Module, impl: Method, view: BackboneView, base_tensors: set[int]) -> None:
    """Freeze ``model``, let the method change it, check the result, then make the head
    trainable if asked."""
    was_training = model.training
    freeze(model)
    view.prepare_model()  # the family's forward reads every part through its module
    with view.naming(impl.name):  # a missing part's error names the method and family
        impl.apply(model, view)
    follow_base(model, base_tensors)  # new parameters follow the model's device and dtype
    check_forward_path(model, view, impl.name)  # every injected module is called
    if folds_add_bias(model):  # merging gives bias-less layers a bias: not the plain structure
        impl.structure_preserving = False
    if not getattr(impl.config, "norm_stats", False):  # BatchNorm statistics stay pre-trained
        freeze_norm_stats(model)
    model.train(was_training)  # new modules start in training mode; match the model's mode
    if impl.config.train_head:
        for h in view.heads:
            mark_trainable(model.get_submodule(h).parameters())


def trainable_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what the method trained or added, plus the head when it is trained."""
    state = get_state(model)
    keep = trainable_keys(model) | state.added_keys
    return {k: v.detach() for k, v in model.state_dict().items() if k in keep}


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold a mergeable method into the weights: a plain model with the base's module types.

    By default the adapted ``model`` is left as it is and a merged copy is returned. The merged
    model remembers the adapter, so :func:`unmerge` can restore the adapted form.
    """
    state = get_state(model)
    _check_inplace(state, inplace, "merge")
    if state.merged is not None:
        raise ValueError("model is already merged")
    out = model if inplace else copy.deepcopy(model)
    out_state = get_state(out)
    out_state.shares_base = out_state.shares_base and inplace  # a deep copy owns its tensors
    out_state.merged = out_state.method.merge(out)
    return out


def unmerge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Take a merged update back out of the weights and put the method's modules back."""
    state = get_state(model)
    _check_inplace(state, inplace, "unmerge")
    if state.merged is None:
        raise ValueError("model is not merged; nothing to unmerge")
    out = model if inplace else copy.deepcopy(model)
    out_state = get_state(out)
    out_state.shares_base = out_state.shares_base and inplace
    out_state.method.unmerge(out, out_state.merged)
    out_state.merged = None
    return out


@dataclass
class Summary:
    """Parameter counts of an adapted model, with a breakdown by (block-collapsed) module name."""

    method: str
    trainable: int
    trainable_no_head: int
    added: int
    total: int
    base_total: int
    breakdown: list[tuple[str, int, int]]  # (name pattern, tensors, elements), trainable only

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.base_total, 1)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "breakdown"} | {
            "percent": self.percent,
            "breakdown": [list(r) for r in self.breakdown],
        }

    def __str__(self) -> str:
        lines = [
            f"method: {self.method}",
            f"trainable params: {self.trainable:,} ({self.percent:.3f}% of the base model's "
            f"{self.base_total:,})",
            f"trainable params without head: {self.trainable_no_head:,}",
            f"added params: {self.added:,}   total params: {self.total:,}",
            "",
            f"{'trainable module':<48} {'tensors':>8} {'params':>12}",
        ]
        lines += [f"{name:<48} {n:>8} {numel:>12,}" for name, n, numel in self.breakdown]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable / added / total parameter counts and a per-module breakdown."""
    state = get_state(model)
    params = dict(model.named_parameters())
    sd = model.state_dict(keep_vars=True)
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    added = sum(sd[k].numel() for k in state.added_keys if isinstance(sd[k], nn.Parameter))
    total = sum(p.numel() for p in params.values())
    groups: dict[str, list[int]] = {}
    for n, p in trainable.items():
        key = re.sub(r"\.\d+(?=\.)", ".*", n)
        g = groups.setdefault(key, [0, 0])
        g[0] += 1
        g[1] += p.numel()
    return Summary(
        method=state.config.method,
        trainable=sum(p.numel() for p in trainable.values()),
        trainable_no_head=sum(p.numel() for n, p in trainable.items() if n not in state.head_keys),
        added=added,
        total=total,
        base_total=total - added,
        breakdown=[(k, v[0], v[1]) for k, v in groups.items()],
    )
