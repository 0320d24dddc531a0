"""Which added parameters matter: update sizes, added-output sizes, and ablation per block.

Everything is derived from what :func:`vpeft.adapt` recorded and the view, never from the
method's name:

* **update** (reparameterizations and every method that trains base tensors): per module,
  ``||W' - W|| / ||W||`` where ``W'`` is the module's weights after :func:`vpeft.merge` (the
  adapted weights themselves for a method that cannot merge but trains base tensors) and ``W``
  the base model's.
* **added output** (adapters and every other wrapper inside a block): on the given images,
  ``||wrapper(x) - base(x)|| / ||h||``, what the added module changes in its host's output
  relative to the residual stream ``h`` entering the block. A wrapper outside the blocks and the
  heads (a pixel prompt on the input stem, a side network on the final norm) is measured
  relative to its own base output: ``||wrapper(x) - base(x)|| / ||base(x)||``.
* **ablation**: the model with one block's added modules switched off (its wrappers taken out and
  its base tensors restored), which is the model adapted on the other blocks only; its loss and
  accuracy on a split against the adapted model's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.state import get_state, merge
from vpeft.core.surgery import Wrapper, replace_module, wrappers


def block_of(view: BackboneView, path: str) -> int | None:
    """Index of the block holding module or parameter ``path`` (None: outside the blocks)."""
    for i, b in enumerate(view.blocks):
        if path == b or path.startswith(b + "."):
            return i
    return None


def base_name(path: str) -> str:
    """A path in the adapted model as the base model names it (wrappers' ``.base`` dropped)."""
    return ".".join(part for part in path.split(".") if part != "base")


def touched_modules(model: nn.Module, view: BackboneView) -> list[str]:
    """Paths of the modules the method changed, outside the heads: every outermost wrapper and
    every module owning a trained parameter, in model order."""
    state = get_state(model)
    wrapped = [p for p, _ in wrappers(model) if not view.in_head(p)]
    owners = []
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        inside = any(owner == w or owner.startswith(w + ".") for w in wrapped)
        if p.requires_grad and name not in state.head_keys and not view.in_head(owner) \
                and not inside:
            owners.append(owner)
    found = set(wrapped) | set(owners)
    return [n for n, _ in model.named_modules() if n in found]


def blocks_with_added(model: nn.Module, view: BackboneView) -> list[int]:
    """Blocks that hold something the method trained or added."""
    state = get_state(model)
    keys = {n for n, p in model.named_parameters() if p.requires_grad} | state.added_keys
    keys -= state.head_keys
    return sorted({i for k in keys if (i := block_of(view, k)) is not None})


def _existing(model: nn.Module, path: str) -> str:
    """``path``, or its nearest ancestor that ``model`` has (a merge removes the update's own
    sub-modules, e.g. a Hugging Face PEFT layer's ``lora_A``)."""
    names = dict(model.named_modules())
    while path and path not in names:
        path = path.rpartition(".")[0]
    return path


@torch.no_grad()
def update_ratios(adapted: nn.Module, base: nn.Module, view: BackboneView
                  ) -> dict[str, float] | None:
    """``||W' - W|| / ||W||`` of each changed module that has base weights (see module doc);
    None where the method changes no base weight (it only adds modules and cannot merge)."""
    state = get_state(adapted)
    base_params = dict(base.named_parameters())
    if state.method.mergeable:  # the merged model has the base's names: compare module-wise
        merged = merge(adapted)
        names = dict.fromkeys(_existing(merged, base_name(m)) for m in touched_modules(adapted,
                                                                                  view))
        pairs = [(f"{m}.{n}", p) for m in names
                 for n, p in merged.get_submodule(m).named_parameters()]
    else:  # only the base tensors it trains in place have a W to compare with
        pairs = [(base_name(n), p) for n, p in adapted.named_parameters()
                 if p.requires_grad and n not in state.head_keys and base_name(n) in base_params]
    sums: dict[str, list[float]] = {}
    for key, p in pairs:
        w = base_params.get(key)
        if w is None and key.endswith(".bias"):
            w = torch.zeros_like(p)  # a bias that merging gave a bias-less layer
        if w is None or w.shape != p.shape:
            continue
        s = sums.setdefault(key.rpartition(".")[0], [0.0, 0.0])
        s[0] += float((p.float() - w.float()).pow(2).sum())
        s[1] += float(w.float().pow(2).sum())
    return {m: (a ** 0.5) / max(b ** 0.5, 1e-12) for m, (a, b) in sums.items()} or None


@torch.no_grad()
def added_outputs(adapted: nn.Module, view: BackboneView, x: torch.Tensor
                  ) -> dict[str, float] | None:
    """Mean over ``x`` of ``||wrapper(x) - base(x)|| / ||h||`` for every outermost wrapper whose
    output has its base's shape (``h``: the residual stream entering the wrapper's block, or the
    base output for a wrapper outside the blocks; heads are left out). None where the method has
    no such wrapper."""
    residual: dict[int, torch.Tensor] = {}
    sizes: dict[str, torch.Tensor] = {}
    handles = []

    def block_hook(i: int):
        def hook(module, args):
            residual[i] = args[0].detach().flatten(1).float().norm(dim=1)
        return hook

    def wrapper_hook(path: str, i: int | None):
        def hook(module: Wrapper, args, kwargs, out):
            try:
                ref = module.base(*args, **kwargs)
            except (AssertionError, RuntimeError):  # a base that only runs through its wrapper
                return  # (open_clip's attention, whose projections the family's prepare packed)
            if isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor) \
                    and out.shape == ref.shape:
                delta = (out - ref).detach().flatten(1).float().norm(dim=1)
                scale = ref.flatten(1).float().norm(dim=1) if i is None else residual[i]
                sizes[path] = delta / scale.clamp_min(1e-12)
        return hook

    for i, p in enumerate(view.blocks):
        handles.append(adapted.get_submodule(p).register_forward_pre_hook(block_hook(i)))
    for path, w in wrappers(adapted):
        if not view.in_head(path):
            handles.append(w.register_forward_hook(wrapper_hook(path, block_of(view, path)),
                                                   with_kwargs=True))
    try:
        adapted.eval()
        adapted(x)
    finally:
        for h in handles:
            h.remove()
    return {base_name(k): float(v.mean()) for k, v in sizes.items()} or None


def switch_off_block(adapted: nn.Module, base: nn.Module, view: BackboneView, i: int
                     ) -> nn.Module:
    """A copy of ``adapted`` with block ``i``'s added modules switched off: every wrapper in the
    block replaced by the module it wraps and the block's base tensors restored from ``base``."""
    model = copy.deepcopy(adapted)
    root = view.blocks[i]
    while found := [(p, w) for p, w in wrappers(model) if p == root or p.startswith(root + ".")]:
        for path, w in found:
            replace_module(model, path, w.base)
    base_sd = base.state_dict()
    with torch.no_grad():
        for name, t in model.get_submodule(root).state_dict(prefix=root + ".",
                                                            keep_vars=True).items():
            if name in base_sd and base_sd[name].shape == t.shape:
                t.copy_(base_sd[name])
    get_state(adapted).method.block_switched_off(model, view, i)
    return model


def _feature_shape(model: nn.Module, view: BackboneView, x: torch.Tensor
                   ) -> tuple[int, ...] | str:
    """Shape of what reaches the final norm (or the head), to tell a model whose token sequence
    an ablation broke (e.g. prompts inserted by one block and removed by another); the error
    where the model no longer runs at all (e.g. a head that reads every block's added tokens)."""
    where = view.final_norm or (view.heads[0] if view.heads else None)
    seen = []
    h = None if where is None else model.get_submodule(where).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape))
    try:
        out = model(x)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        if h is not None:
            h.remove()
    return tuple(seen[0] if seen else out.shape)


@torch.no_grad()
def loss_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (percent) of ``model`` over ``(images, labels)`` batches."""
    model.eval()
    loss = correct = n = 0.0
    for images, labels in batches:
        logits = model(images).float()
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(-1) == labels).sum())
        n += len(labels)
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


@torch.no_grad()
def ablation(adapted: nn.Module, base: nn.Module, view: BackboneView,
             batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Loss and accuracy of the adapted model, the base model, and of the adapted model with
    each block's added modules switched off in turn (``blocks``: one entry per block that holds
    any; ``skipped``: blocks whose switch-off would break the token sequence)."""
    loss, acc = loss_accuracy(adapted, batches)
    base_loss, base_acc = loss_accuracy(base, batches)
    probe = batches[0][0][:1]
    want = _feature_shape(base, view, probe)
    out: dict[str, Any] = {"adapted": {"loss": loss, "top1": acc},
                           "base": {"loss": base_loss, "top1": base_acc}, "blocks": {},
                           "skipped": {}}
    for i in blocks_with_added(adapted, view):
        model = switch_off_block(adapted, base, view, i)
        got = _feature_shape(model, view, probe)
        if isinstance(got, str):
            out["skipped"][str(i)] = ("switching this block off alone breaks the model (its "
                                      f"modules feed others, e.g. a widened head): {got}")
            continue
        if got != want:
            out["skipped"][str(i)] = ("switching this block off alone changes the token "
                                      "sequence the head reads (its modules insert or remove "
                                      "tokens for other blocks)")
            continue
        bl, ba = loss_accuracy(model, batches)
        out["blocks"][str(i)] = {"loss": bl, "top1": ba, "delta_loss": bl - loss,
                                 "delta_top1": ba - acc}
    return out
