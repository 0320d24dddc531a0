"""The Method base class: ``apply`` a configuration to a model, ``merge`` it back out.

A method states its characteristics as class attributes; the shared test matrix checks each one
against what the method really does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig
from vpeft.core.surgery import NotMergeableError, Wrapper, replace_module, wrappers
from vpeft.registry import MethodInfo


class Method:
    """One PEFT method. Subclass, set the class attributes, implement :meth:`apply`, register.

    Characteristics (checked by the shared tests):

    * ``mergeable``: :meth:`merge` folds everything into the base weights, after which the model
      has exactly the base model's module types and parameter names.
    * ``structure_preserving``: the merged model (or, for non-mergeable methods, the adapted one)
      has the base model's architecture.
    * ``inference_overhead``: the deployed model (merged where mergeable) costs more than the base.
    * ``memory_saving``: training does not back-propagate through the backbone.
    * ``zero_init``: right after ``apply`` the adapted model computes the same as the base.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]]
    family: ClassVar[str] = ""  # reference | addition | partial | unified
    subfamily: ClassVar[str] = (
        ""  # adapter | prompt | prefix | side | specification | reparameterization
    )
    mergeable: ClassVar[bool] = False
    structure_preserving: ClassVar[bool] = False
    inference_overhead: ClassVar[bool] = True
    memory_saving: ClassVar[bool] = False
    zero_init: ClassVar[bool] = False
    # trainable parameters whose name matches one of these globs get no weight decay (prompts ...)
    no_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    # -- to implement ------------------------------------------------------------------------
    def apply(self, model: nn.Module, view: BackboneView) -> None:
        """Modify ``model`` in place: add modules and/or mark existing parameters trainable.

        The whole model is frozen before this is called; the head is handled afterwards.
        """
        raise NotImplementedError

    # -- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model: nn.Module) -> dict[str, Wrapper]:
        """Fold every wrapper into its base module and put the base back in place.

        Returns the removed wrappers by path, so :meth:`unmerge` can put them back.
        """
        if not self.mergeable:
            raise NotMergeableError(
                f"method '{self.name}' is not mergeable: its modules stay in the model at inference"
            )
        removed: dict[str, Wrapper] = {}
        for path, wrapper in wrappers(model):
            replace_module(model, path, wrapper.fold())
            removed[path] = wrapper
        return removed

    @torch.no_grad()
    def unmerge(self, model: nn.Module, removed: dict[str, Wrapper]) -> None:
        """Undo :meth:`merge`: take each update back out of the base and re-insert its wrapper."""
        for path, wrapper in removed.items():
            wrapper.base = model.get_submodule(path)
            wrapper.unfold()
            replace_module(model, path, wrapper)

    # -- description ---------------------------------------------------------------------------
    @classmethod
    def info(cls) -> MethodInfo:
        doc = (cls.__doc__ or "").strip().splitlines()
        return MethodInfo(
            name=cls.name,
            family=cls.family,
            subfamily=cls.subfamily,
            mergeable=cls.mergeable,
            structure_preserving=cls.structure_preserving,
            inference_overhead=cls.inference_overhead,
            memory_saving=cls.memory_saving,
            summary=doc[0] if doc else "",
        )
