"""The Method base class: ``apply`` a configuration to a model, ``merge`` it back out.

A method states its characteristics as class attributes; the shared test matrix checks each one
against what the method really does.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Hashable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig
from vpeft.core.surgery import NotMergeableError, Wrapper, replace_module, wrappers
from vpeft.registry import MethodInfo


class SearchSpace(Protocol):
    """The subnets of a searchable (unified) method, as the engine's search uses them.

    A candidate is any hashable value the space makes; the engine only passes it back. The
    engine trains ``supernet_options()`` with a random :meth:`sample` set by :meth:`set_subnet`
    before every step, scores candidates on a validation split, evolves them with
    :meth:`mutate` / :meth:`crossover` under a budget of :meth:`params`, and retrains the winner
    as ``subnet_options(best)``: an ordinary adapter of the same method.
    """

    def sample(self, rng: random.Random) -> Hashable: ...

    def mutate(self, c: Any, rng: random.Random, m_prob: float, s_prob: float) -> Hashable: ...

    def crossover(self, a: Any, b: Any, rng: random.Random) -> Hashable: ...

    def params(self, c: Any) -> int:
        """Trainable parameters (head excluded) of candidate ``c`` retrained as a subnet."""
        ...

    def bounds(self) -> tuple[int, int]:
        """The fewest and the most parameters any candidate has (to check a budget early)."""
        ...

    def supernet_options(self) -> dict[str, Any]: ...

    def subnet_options(self, c: Any) -> dict[str, Any]: ...

    def set_subnet(self, model: nn.Module, c: Any) -> None:
        """Make a supernet built with :meth:`supernet_options` compute candidate ``c``."""
        ...

    def describe(self) -> dict[str, Any]:
        """The space as JSON (written to the search record)."""
        ...


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
    # importable packages the method needs beyond vpeft's own (e.g. ("peft",))
    requires: ClassVar[tuple[str, ...]] = ()
    # whether search_space() is implemented (a method that ``vpeft search`` can search)
    searchable: ClassVar[bool] = False

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

    # -- explanation -------------------------------------------------------------------------
    def block_switched_off(self, model: nn.Module, view: BackboneView, i: int) -> None:
        """Called after block ``i``'s wrappers were taken out of ``model`` (a copy) and its base
        tensors restored (:func:`vpeft.explain.switch_off_block`): a method whose block modules
        feed something outside the block (VQT's widened head) makes the rest of the model the
        one it would have built without block ``i``. Nothing to do by default."""

    # -- search and requirements ---------------------------------------------------------------
    @classmethod
    def search_space(cls, view: BackboneView, **space: Any) -> SearchSpace:
        """The method's search space on a backbone (``space``: user overrides of its defaults)."""
        raise ValueError(f"method '{cls.name}' has no search space; searchable methods are the "
                         "unified ones listed by `vpeft methods` with searchable = yes")

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """The packages of ``requires`` that cannot be imported here."""
        return [r for r in cls.requires if importlib.util.find_spec(r) is None]

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
            requires=cls.requires,
            searchable=cls.searchable,
            summary=doc[0] if doc else "",
        )
