"""Several task adapters on one frozen backbone: :class:`MultiTaskModel`.

Each task is the backbone adapted by its own method (any method, one per task), built around the
*same* frozen tensors: the task's module tree is a copy of the backbone's in which every parameter
and buffer is the backbone's own object. A task therefore costs its adapter and its head, not a
copy of the backbone. Tensors a method trains in place (BitFit's biases, a head of the backbone's
size, everything for ``full``) are copied for that task when it is added, so training one task
never changes the backbone or another task.

>>> tasks = vpeft.MultiTaskModel(timm.create_model("deit_tiny_patch16_224", pretrained=True))
>>> tasks.load("cifar", "runs/cifar-lora")          # a saved adapter
>>> tasks.add("pets", "vpt-deep", num_classes=37)    # a new one, to train
>>> logits = tasks(images, task="cifar")
>>> per_image = tasks(images, task=["cifar", "pets", "cifar"])   # a mixed-task batch

A PEFT-like interface on top (Hugging Face PEFT's names): ``add_adapter`` / ``load_adapter``,
``set_adapter`` (the task ``forward(x)`` runs when no task is named), ``disable_adapter()`` (a
context in which ``forward`` gives the plain backbone's outputs), ``delete_adapter``, and for LoRA
``add_weighted_adapter`` (a weighted sum of several adapters' updates as one new adapter, exact).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpeft.backbones.base import get_view
from vpeft.core.checkpoint import (
    CONFIG_NAME,
    check_base,
    config_from_meta,
    load,
    read_config,
    save,
)
from vpeft.core.combine import combine_into, combined_config
from vpeft.core.config import MethodConfig
from vpeft.core.state import Rollback, adapt, get_state


def _trained_in_place(model: nn.Module) -> list[str]:
    """Names of the base tensors outside the head that ``model``'s method trains in place."""
    state = get_state(model)
    base = {id(p) for _, saved in state.before.modules
            for p in saved["_parameters"].values() if p is not None}
    return [n for n, p in model.named_parameters()
            if p.requires_grad and id(p) in base and n not in state.head_keys]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which the adapted ``model`` computes the base model exactly as
    :func:`vpeft.adapt` found it (its head as it was then too); the adapter comes back after.

    The module tree is put back as it was before the method changed it (every module's own
    attributes, no tensor copied) and the head's saved copy stands in for the trained head.
    Methods that train backbone tensors in place (BitFit's biases, ``full``) have lost the base
    values: they are refused (a :class:`MultiTaskModel` keeps the backbone's own copy).
    """
    state = get_state(model)
    if state.merged is not None:
        raise ValueError("the model is merged: unmerge it to disable its adapter")
    if state.before is None:
        raise ValueError("this model does not know its base form (adapted by an older vpeft)")
    changed = _trained_in_place(model)
    if changed:
        raise ValueError(f"'{state.config.method}' trains the backbone's own tensors in place "
                         f"({', '.join(changed[:3])}...), so the base values are gone; use a "
                         "MultiTaskModel of the base model, which keeps them")
    mode = {m: m.training for m in model.modules()}
    now = Rollback(model)
    try:
        state.before.restore()
        for p, flag in now.flags:  # today's requires_grad: the frozen base stays frozen
            p.requires_grad_(flag)
        current = dict(now.modules)
        for module, _ in state.before.modules:  # the tree as it was, in today's mode ...
            module.training = mode.get(module, module.training)
            buffers = current.get(module, {}).get("_buffers", {})  # ... and moved buffers
            module._buffers.update({k: buffers[k] for k in module._buffers if k in buffers})
        for key, saved in state.base_head.items():  # the head's values from before training
            path, _, name = key.rpartition(".")
            owner = model.get_submodule(path)
            kind = "_parameters" if name in owner._parameters else "_buffers"
            like = current.get(owner, owner.__dict__)[kind][name]  # today's device and dtype
            value = saved.to(like)
            if kind == "_parameters":
                value = nn.Parameter(value, requires_grad=False)
            # a new table: the saved one must keep the model's own tensor
            owner.__dict__[kind] = {**owner.__dict__[kind], name: value}
        yield model
    finally:
        now.restore()


class MultiTaskModel(nn.Module):
    """A frozen backbone and named task models that share its tensors.

    ``tasks[name]`` (or ``tasks.task(name)``) is an ordinary adapted model: train it, save it,
    ``vpeft.summary`` it. ``forward(x, task=name)`` runs one task, ``forward(x, task=[names])``
    a mixed-task batch (:meth:`forward_mixed`). Merging a task in place is refused (it would
    change the shared weights); ``vpeft.merge(tasks[name])`` returns a standalone merged copy.
    """

    def __init__(self, backbone: nn.Module) -> None:
        if get_state(backbone, required=False) is not None:
            raise ValueError(
                "MultiTaskModel needs the plain backbone, not an adapted model; add the adapted "
                "task with .load(name, directory) after saving it"
            )
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.tasks = nn.ModuleDict()
        self.active_adapter: str | None = None  # the task forward(x) runs; see set_adapter
        self._disabled = False

    @classmethod
    def from_adapted(cls, model: nn.Module, name: str = "default") -> MultiTaskModel:
        """A MultiTaskModel whose backbone is ``model``'s base (as :func:`disable_adapter`
        computes it, sharing its frozen tensors) and whose task ``name`` is ``model`` itself,
        made active: the PEFT-like interface for an adapted model."""
        with disable_adapter(model):
            base = copy.deepcopy(model, memo={id(t): t for t in
                                              model.state_dict(keep_vars=True).values()})
        tasks = cls(base)
        tasks._check_name(name)
        get_state(model).shares_base = True
        tasks.tasks[name] = model
        tasks.active_adapter = name
        return tasks

    # -- building tasks --------------------------------------------------------------------------
    def _shared(self) -> dict[int, torch.Tensor]:
        return {id(t): t for t in self.backbone.state_dict(keep_vars=True).values()}

    def _check_name(self, name: str) -> None:
        if not name or "." in name:
            raise ValueError(f"task name must be non-empty and without '.', got {name!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} exists already; remove it first")

    def _new_task(self, name: str, num_classes: int | None) -> nn.Module:
        self._check_name(name)
        model = copy.deepcopy(self.backbone, memo=dict(self._shared()))
        if num_classes is not None and num_classes != getattr(model, "num_classes", None):
            reset = getattr(model, "reset_classifier", None)
            if reset is None:
                raise ValueError(
                    f"{type(model).__name__} has no reset_classifier(); tasks of this backbone "
                    f"must keep its {getattr(model, 'num_classes', '?')} classes"
                )
            reset(num_classes)
        return model

    def _own_trained(self, model: nn.Module) -> None:
        """Give ``model`` its own copy of every shared tensor its method trains."""
        shared, copies = self._shared(), {}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.requires_grad and id(p) in shared:
                    if id(p) not in copies:  # one copy per tensor keeps tied weights tied
                        copies[id(p)] = nn.Parameter(p.detach().clone())
                    module._parameters[key] = copies[id(p)]
        for key in copies:  # adapt() marked the shared originals trainable: freeze them again
            shared[key].requires_grad_(False)
        get_state(model).shares_base = True

    def add(
        self,
        name: str,
        method: str | MethodConfig,
        num_classes: int | None = None,
        **options: Any,
    ) -> nn.Module:
        """Add task ``name`` adapted with ``method`` (and its options); returns its model.

        ``num_classes`` gives the task its own classifier of that size (default: the backbone's).
        """
        model = self._new_task(name, num_classes)
        adapt(model, method, **options)
        self._own_trained(model)
        self.tasks[name] = model
        return model

    def load(self, name: str, directory: str | os.PathLike, strict_base: bool = True) -> nn.Module:
        """Add task ``name`` from an adapter saved by ``vpeft.save``; returns its model.

        The checkpoint must have been made for this backbone (checked as ``vpeft.load`` does);
        its head size is taken from the checkpoint.
        """
        meta = read_config(directory)
        model = self._new_task(name, meta["base"]["num_classes"])
        check_base(meta, model, directory, strict_base)
        adapt(model, config_from_meta(meta, directory))
        self._own_trained(model)
        load(model, directory)
        self.tasks[name] = model
        return model

    def remove(self, name: str) -> nn.Module:
        """Take task ``name`` out and return its model."""
        model = self.task(name)
        del self.tasks[name]
        if self.active_adapter == name:
            self.active_adapter = None
        return model

    # -- the PEFT-like interface -----------------------------------------------------------------
    add_adapter = add
    load_adapter = load

    def delete_adapter(self, name: str) -> None:
        """Remove task ``name``; its tensors are freed once nothing else refers to its model."""
        self.remove(name)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the task that ``forward(x)`` runs when no task is given."""
        self.task(name)
        self.active_adapter = name

    @contextmanager
    def disable_adapter(self) -> Iterator[MultiTaskModel]:
        """A context in which ``forward`` (whatever task it is given) returns the plain
        backbone's outputs: the base model, its own head included."""
        before, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = before

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], name: str,
                             head_from: str | None = None) -> nn.Module:
        """A new LoRA task ``name`` whose update of every layer is ``sum_i weights[i] * update_i``
        of the LoRA tasks ``adapters``, exactly (rank ``sum r_i``; see :mod:`vpeft.core.combine`).

        The head is copied from ``head_from`` (default: the first adapter); the tasks must adapt
        the same layers. Returns the new task's model.
        """
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, "
                             f"{len(weights)} weights")
        sources = [self.task(a) for a in adapters]
        head = self.task(head_from or adapters[0])
        model = self.add(name, combined_config(sources), num_classes=getattr(head, "num_classes",
                                                                            None))
        try:
            combine_into(model, sources, [float(w) for w in weights])
            heads = {k: v for k, v in head.state_dict().items() if k in get_state(head).head_keys}
            model.load_state_dict(heads, strict=False)
        except BaseException:
            self.remove(name)
            raise
        return model

    # -- using tasks -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tasks.keys())

    def task(self, name: str) -> nn.Module:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; tasks: {self.names}")
        return self.tasks[name]

    __getitem__ = task

    def forward(self, x: torch.Tensor, task: str | Sequence[str] | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        """Logits of ``task`` (default: the active adapter) for the batch ``x``; with a list of
        task names, one per image, a list of each image's logits (:meth:`forward_mixed`). Inside
        :meth:`disable_adapter`, the backbone's own outputs."""
        if self._disabled:
            return self.backbone(x)
        if task is None:
            if self.active_adapter is None:
                raise ValueError(f"no task given and no active adapter; pass task= or call "
                                 f"set_adapter(name) (tasks: {self.names})")
            task = self.active_adapter
        if isinstance(task, str):
            return self.task(task)(x)
        return self.forward_mixed(x, task)

    def forward_mixed(self, x: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """One forward over images of different tasks: ``tasks[i]`` names image ``i``'s task;
        returns image ``i``'s logits (from its task's adapter and head) at position ``i``.

        Images are grouped by task and each group runs through its task once, as one batch, so
        the result for an image is what its task computes on that group alone. What is shared:
        the frozen tensors (one copy in memory, read by every group), the input batch (groups
        are index views of it, no decoding or copying per task) and the caller's batching. The
        frozen computation is shared where the methods allow it: tasks whose models compute the
        backbone's own features (only their heads differ, e.g. ``linear`` probes; see
        :meth:`reads_backbone_features`) get one ``forward_features`` pass over all their
        images together, then each its own head. A task whose method changes the forward (from
        the pixels on for visual prompts, the token sequence for VPT) runs its group alone.
        """
        if len(tasks) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(tasks)} task names; give one per image")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(tasks):
            groups.setdefault(name, []).append(i)
        for name in groups:
            self.task(name)  # every name checked before any work
        out: list[torch.Tensor] = [x.new_empty(0)] * len(tasks)
        heads_only = [n for n in groups if self.reads_backbone_features(n)]
        if len(heads_only) > 1:  # one backbone pass for every head-only task's images
            index = sorted(i for n in heads_only for i in groups[n])
            feats = self.backbone.forward_features(x[torch.tensor(index, device=x.device)])
            row = {i: k for k, i in enumerate(index)}
            for name in heads_only:
                members = groups.pop(name)
                rows = torch.tensor([row[i] for i in members], device=x.device)
                for i, logits in zip(members, self.tasks[name].forward_head(feats[rows])):
                    out[i] = logits
        for name, index in groups.items():
            batch = x if len(index) == len(tasks) else x[torch.tensor(index, device=x.device)]
            for i, logits in zip(index, self.tasks[name](batch)):
                out[i] = logits
        return out

    def reads_backbone_features(self, name: str) -> bool:
        """Whether task ``name`` computes exactly the backbone's features and differs only in
        its head: every tensor outside its heads is the backbone's own object, its module
        types match the backbone's, both are in the same mode, and the model has timm's
        ``forward_features`` / ``forward_head`` split. Read from the model, not the method."""
        model = self.tasks[name]
        if not (hasattr(model, "forward_head") and hasattr(self.backbone, "forward_features")
                and model.training == self.backbone.training):
            return False
        heads = tuple(h + "." for h in get_view(model).heads)
        shared = self._shared()
        if not heads or any(id(t) not in shared for n, t in
                            model.state_dict(keep_vars=True).items() if not n.startswith(heads)):
            return False
        types = [(n, type(m)) for n, m in model.named_modules() if not (n + ".").startswith(heads)]
        return types == [(n, type(m)) for n, m in self.backbone.named_modules()
                         if not (n + ".").startswith(heads)]

    def parameter_counts(self) -> dict[str, int]:
        """Elements stored once for the backbone, and for each task what it stores on its own."""
        shared = {id(t) for t in self.backbone.state_dict(keep_vars=True).values()}
        counts = {"backbone": sum(t.numel() for t in self.backbone.parameters())}
        for name, model in self.tasks.items():
            own = {id(p): p for p in model.parameters() if id(p) not in shared}
            counts[name] = sum(p.numel() for p in own.values())
        return counts

    # -- files -----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save every task's adapter as ``directory/<task>/`` (the backbone is not written)."""
        root = Path(directory)
        for name, model in self.tasks.items():
            save(model, root / name, overwrite=overwrite)
        return root

    @classmethod
    def from_directory(
        cls, backbone: nn.Module, directory: str | os.PathLike, strict_base: bool = True
    ) -> MultiTaskModel:
        """A MultiTaskModel with every adapter found in ``directory/<task>/``."""
        root = Path(directory)
        found = sorted(p.parent for p in root.glob(f"*/{CONFIG_NAME}"))
        if not found:
            raise FileNotFoundError(f"no saved adapters (*/{CONFIG_NAME}) under {root}")
        tasks = cls(backbone)
        for path in found:
            tasks.load(path.name, path, strict_base)
        return tasks
