"""Backbone views: where a model keeps its blocks, attention, MLP, heads and tokens.

A method asks the view, never the model's class name, so one method file serves every family that
has the parts it needs; a missing part raises :class:`MissingPartError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn


class MissingPartError(ValueError):
    """The backbone lacks a part that a method needs (attention, token sequence, blocks ...).

    ``part`` names what is missing where the raiser knows it in a word (``"sequence_tokens"``).
    """

    def __init__(self, message: str, part: str = "") -> None:
        super().__init__(message)
        self.part = part


@dataclass
class BackboneView:
    """What methods need to know about a backbone. Built by :func:`get_view`.

    ``blocks`` are dotted paths of the residual blocks in forward order; ``attn``/``mlp``/``qkv``
    are names relative to a block (``None`` where the family has no such part); ``qkv_separate``
    names the separate q, k and v projections where the attention has no fused ``qkv``;
    ``heads`` are the classifier modules trained together with every method. ``block_dims`` is
    each block's token width (it grows per stage on hierarchical models); ``embed_dim`` is the
    width of the features the final norm sees (the last stage's on hierarchical models).
    """

    family: str
    model: nn.Module
    blocks: list[str] = field(default_factory=list)
    block_dims: list[int] = field(default_factory=list)
    attn: str | None = None
    qkv: str | None = None
    qkv_separate: tuple[str, str, str] | None = None  # (q, k, v) Linear paths in a block
    mlp: str | None = None
    norms: tuple[str, ...] = ()
    heads: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # CNN stages (a block list each), in order
    convs: list[str] = field(default_factory=list)  # every Conv2d inside the blocks
    final_features: str | None = None  # the layer after the blocks that feeds the head (conv_head)
    patch_embed: str | None = None
    final_norm: str | None = None
    sequence_tokens: bool = False  # blocks take (B, N, D) token sequences
    # the tensor layout blocks take and return: 'tokens' (B, N, D) with the prefix tokens first,
    # 'nhwc' or 'nchw' maps; '' where methods cannot rely on one (HF, open_clip blocks)
    block_layout: str = ""
    num_prefix_tokens: int = 0  # class/distillation/register tokens before the patch tokens
    embed_dim: int = 0
    patch_size: int | None = None
    in_chans: int = 3
    # makes the family's forward read every part through its module (e.g. a bias that timm adds
    # with F.linear(x, qkv.weight) is moved after qkv(x)), so wrappers of those parts are called
    prepare: Callable[[nn.Module], None] | None = field(default=None, repr=False)

    def require(self, *parts: str, method: str = "") -> None:
        """Raise a clear error if any of ``parts`` (attribute names of this view) is missing."""
        missing = [p for p in parts if not getattr(self, p)]
        if missing:
            who = f"method '{method}'" if method else "this method"
            raise MissingPartError(
                f"{who} needs {', '.join(missing)} but the backbone "
                f"{type(self.model).__name__} (view '{self.family}') has none",
                part=", ".join(missing),
            )

    def in_head(self, path: str) -> bool:
        """Whether the module or parameter at dotted ``path`` is (inside) a classifier head."""
        return any(path == h or path.startswith(h + ".") for h in self.heads)

    def block_part(self, i: int, part: str) -> str:
        """Path of ``part`` (``'attn'``, ``'mlp'``, ``'qkv'`` ...) inside block ``i``."""
        rel = getattr(self, part, None) or part
        return f"{self.blocks[i]}.{rel}"

    def fused_qkv_paths(self) -> set[str]:
        """Paths of the blocks' fused q/k/v projections (empty where there are none)."""
        return {self.block_part(i, "qkv") for i in range(self.depth)} if self.qkv else set()

    def separate_qkv_paths(self, which: str = "qkv") -> set[str]:
        """Paths of the blocks' separate projections among ``which`` (``'qv'`` -> q and v)."""
        if not self.qkv_separate:
            return set()
        rel = [p for c, p in zip("qkv", self.qkv_separate) if c in which]
        return {f"{b}.{p}" for b in self.blocks for p in rel}

    @property
    def has_qkv(self) -> bool:
        """Whether the blocks' attention has q/k/v projections (fused or separate)."""
        return bool(self.qkv or self.qkv_separate)

    def sublayers(self, asked: tuple[str, ...], default: tuple[str, ...],
                  method: str = "") -> tuple[str, ...]:
        """The block sub-layers (``'attn'``, ``'mlp'``) a method goes to.

        A method's ``default`` shrinks to the sub-layers this family has (ConvNeXt blocks have an
        MLP but no attention); an explicit choice must exist as asked. Raises
        :class:`MissingPartError` when nothing is left.
        """
        self.require("blocks", method=method)
        if tuple(asked) == tuple(default):
            present = tuple(p for p in asked if getattr(self, p))
            if present:
                return present
        self.require(*asked, method=method)
        return tuple(asked)

    def update_targets(self, types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
                       method: str = "") -> list[str]:
        """Where a weight-update method (LoRA and kin) goes by default on a family whose
        attention has no q/k/v projections, in model order, among ``types``:

        * the layers of every block's MLP (ConvNeXt's ``fc1``/``fc2``, Linear or 1 x 1 conv);
        * else (a CNN) every convolution of the blocks but depthwise ones, whose kernels have a
          single input channel, plus ``final_features`` (the conv whose output the head reads).

        Raises :class:`MissingPartError` (part ``qkv``) when the family has none of them.
        """
        from vpeft.core.conv import is_depthwise  # core imports this module: import late

        if self.mlp and self.blocks:
            roots = [self.block_part(i, "mlp") for i in range(self.depth)]
            paths = [f"{r}.{n}" for r in roots
                     for n, m in self.model.get_submodule(r).named_modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d))]
        else:
            paths = [p for p in self.convs if not is_depthwise(self.model.get_submodule(p))]
            paths += [self.final_features] if self.final_features else []
        paths = [p for p in paths if isinstance(self.model.get_submodule(p), types)]
        if not paths:
            self.require("qkv", "mlp", method=method)
        return paths

    @contextmanager
    def naming(self, method: str) -> Iterator[None]:
        """Re-raise a :class:`MissingPartError` from inside so that it names ``method`` and this
        family (a part's own message may say only what is missing)."""
        try:
            yield
        except MissingPartError as e:
            if f"view '{self.family}'" in str(e):
                raise
            raise type(e)(  # the same kind of error (e.g. TargetNotFoundError), with context
                f"method '{method}' cannot adapt {type(self.model).__name__} (view "
                f"'{self.family}'): {e}",
                part=e.part,
            ) from e

    def prepare_model(self) -> None:
        """Run the family's :attr:`prepare` step on the model (no-op where it has none)."""
        if self.prepare is not None:
            self.prepare(self.model)

    @property
    def depth(self) -> int:
        return len(self.blocks)


_VIEW_BUILDERS: list = []


def register_view(builder):
    """Register ``builder(model) -> BackboneView | None``; the first non-None answer wins."""
    _VIEW_BUILDERS.append(builder)
    return builder


def get_view(model: nn.Module) -> BackboneView:
    """The view of ``model``: a specific family's if one matches, else a generic one."""
    from vpeft import backbones  # noqa: F401 - registers the built-in views

    for builder in _VIEW_BUILDERS:
        view = builder(model)
        if view is not None:
            return view
    return generic_view(model)


def staged_blocks(stages: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """``(path, block)`` of every ``blocks`` entry of every stage in ``stages`` (a hierarchical
    model's ``model.<prefix>``), in forward order."""
    return [
        (f"{prefix}.{s}.blocks.{j}", block)
        for s, stage in enumerate(stages)
        for j, block in enumerate(stage.blocks)
    ]


def head_paths(model: nn.Module) -> list[str]:
    """Classifier modules, found through timm's ``get_classifier`` where the model has one."""
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return []
    heads = getter()
    heads = heads if isinstance(heads, tuple) else (heads,)
    ids = {id(h): None for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and n]


def generic_view(model: nn.Module) -> BackboneView:
    return BackboneView(family="generic", model=model, heads=head_paths(model))
