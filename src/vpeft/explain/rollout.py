"""Attention maps of token models: capture every block's attention, and attention rollout.

Attention is captured without knowing how a block computes it: while :func:`capture_attention`
is active, ``torch.nn.functional.scaled_dot_product_attention`` (what timm's attention and
vpeft's prefix/VQT attention call) also records ``softmax(q k^T * scale + mask)``, averaged over
heads, for the block that is running (a forward pre-hook on each of the view's blocks says which).
The output of the attention is untouched.

Token layout (the view's convention, shared by every prompt method): the query sequence is
``[prefix tokens | added tokens (prompts) | patch tokens]`` and an attention may have extra keys
*before* its own (prefix-tuning). Rollout (Abnar and Zuidema, 2020, arXiv:2005.00928) is taken
over the image tokens only (prefix + patches): attention to added tokens is dropped and each row
renormalised; that mass is reported separately by :func:`added_token_mass`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView


@dataclass
class TokenLayout:
    """Where the prefix, added and patch tokens are in a block's queries and keys."""

    num_prefix: int
    grid: tuple[int, int]  # patch rows, patch columns

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_image_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def image_queries(self, nq: int) -> torch.Tensor:
        """Indices of the prefix and patch tokens among ``nq`` queries."""
        return torch.cat([torch.arange(self.num_prefix),
                          torch.arange(nq - self.num_patches, nq)])

    def added_keys(self, nq: int, nk: int) -> torch.Tensor:
        """Indices of the added keys: extra leading keys, then the added tokens of the sequence."""
        extra = nk - nq
        return torch.cat([torch.arange(extra),
                          torch.arange(extra + self.num_prefix, extra + nq - self.num_patches)])


def token_layout(view: BackboneView, image_size: tuple[int, int]) -> TokenLayout | None:
    """The layout of a token model's sequence for images of ``image_size`` (None: no tokens)."""
    if not (view.sequence_tokens and view.patch_size):
        return None
    h, w = image_size
    return TokenLayout(view.num_prefix_tokens, (h // view.patch_size, w // view.patch_size))


def feature_layout(view: BackboneView, image_size: tuple[int, int], tokens: int
                   ) -> TokenLayout | None:
    """The layout of a sequence of ``tokens`` in a model whose view does not fix one (Hugging
    Face and open_clip towers, a downsampled stage): the view's where it has one; else the last
    ``(H / patch) * (W / patch)`` tokens are the patches and any before them prefix tokens; else
    a square grid of all the tokens (a merged stage); None where neither fits."""
    if (layout := token_layout(view, image_size)) is not None:
        return layout
    if view.patch_size:
        h, w = image_size
        grid = (h // view.patch_size, w // view.patch_size)
        if tokens >= grid[0] * grid[1]:
            return TokenLayout(tokens - grid[0] * grid[1], grid)
    side = math.isqrt(tokens)
    return TokenLayout(0, (side, side)) if side * side == tokens else None


@dataclass
class Attention:
    """Head-averaged attention of each block: ``maps[i]`` is (B, queries, keys) or None."""

    maps: list[torch.Tensor | None] = field(default_factory=list)


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The probabilities ``scaled_dot_product_attention`` weighs ``v`` with, (..., Nq, Nk)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril_()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(dim=-1)


@contextlib.contextmanager
def capture_attention(model: nn.Module, view: BackboneView, with_grad: bool = False
                      ) -> Iterator[Attention]:
    """Record each block's attention during the forwards inside the ``with``.

    A block that calls attention several times (VQT's queries) keeps the call with the most
    queries (its own token sequence); a block whose attention is windowed or absent gets None.
    ``with_grad``: keep every head, (B, heads, Nq, Nk), in the autograd graph, the attention's
    output computed from exactly these probabilities (so their gradient is the model's); for
    gradient-weighted rollout, in evaluation mode (no attention dropout).
    """
    out = Attention([None] * view.depth)
    current = [-1]
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        i = current[0]
        if i >= 0 and with_grad:
            probs = attention_probs(q, k, attn_mask, is_causal, scale)
            seen = out.maps[i]
            if seen is None or probs.shape[-2] > seen.shape[-2]:
                out.maps[i] = probs
            return (probs.to(v.dtype) @ v) if not kw else original(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, **kw)
        if i >= 0:
            probs = attention_probs(q.detach(), k.detach(), attn_mask, is_causal, scale)
            probs = probs.mean(dim=1) if probs.ndim == 4 else probs  # heads averaged
            seen = out.maps[i]
            if seen is None or probs.shape[-2] > seen.shape[-2]:
                out.maps[i] = probs
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)

    def enter(i: int):
        def hook(module, args):
            current[0] = i
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(enter(i))
               for i, p in enumerate(view.blocks)]
    # timm attention computes softmax itself unless fused: make every one call sdpa meanwhile
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = True
    F.scaled_dot_product_attention = sdpa
    try:
        yield out
    finally:
        F.scaled_dot_product_attention = original
        for m, flag in fused:
            m.fused_attn = flag
        for h in handles:
            h.remove()


def image_tokens(a: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, Nq, Nk) attention (or relevance) restricted to the image tokens: (B, T, T)."""
    nq, nk = a.shape[-2:]
    rows = layout.image_queries(nq).to(a.device)
    cols = rows + (nk - nq)
    return a[:, rows][:, :, cols]


def image_token_attention(a: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, Nq, Nk) attention restricted to the image tokens, rows renormalised: (B, T, T)."""
    sub = image_tokens(a, layout)
    return sub / sub.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of square, row-stochastic (B, T, T) maps in forward order: each layer
    is ``(A + I) / 2`` (the residual path), rows renormalised, multiplied through the layers.
    Every row of the result is a distribution over the input tokens."""
    b, t, _ = attentions[0].shape
    eye = torch.eye(t, device=attentions[0].device)
    joint = eye.expand(b, t, t)
    for a in attentions:
        a = 0.5 * a.float() + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint


def pooled_patch_map(joint: torch.Tensor, layout: TokenLayout, pooled_by_prefix: bool
                     ) -> torch.Tensor:
    """(B, grid_h, grid_w): the rows of a (B, T, T) token-to-token map that the pooled feature
    reads (the prefix tokens', else every patch's), averaged, over the patches, summing to 1."""
    p = layout.num_prefix
    rows = joint[:, :p] if pooled_by_prefix and p else joint[:, p:]
    patch = rows.mean(dim=1)[:, p:]
    patch = patch / patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return patch.view(-1, *layout.grid)


def rollout_map(att: Attention, layout: TokenLayout, pooled_by_prefix: bool) -> torch.Tensor:
    """(B, grid_h, grid_w) rollout of the pooled feature over the patches, each summing to 1.

    The pooled feature is the prefix tokens' (class token) when ``pooled_by_prefix``, else the
    mean of the patch tokens (average-pooled models).
    """
    joint = rollout([image_token_attention(a, layout) for a in att.maps if a is not None])
    return pooled_patch_map(joint, layout, pooled_by_prefix)


def added_token_mass(a: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
    """Per image, the mean attention mass the image tokens give to added keys (prompts or
    prefixes) in one block; None where the block has no added keys."""
    nq, nk = a.shape[-2:]
    keys = layout.added_keys(nq, nk).to(a.device)
    if keys.numel() == 0:
        return None
    rows = layout.image_queries(nq).to(a.device)
    return a[:, rows][:, :, keys].sum(dim=-1).mean(dim=-1)


def prompt_patch_maps(att: Attention, layout: TokenLayout) -> torch.Tensor | None:
    """(B, added keys, grid_h, grid_w): how much each patch attends to each added key, averaged
    over the blocks that have them (None where no block has added keys). Key ``j`` is the
    ``j``-th added key of its block (VPT-deep and prefix learn a new set per block)."""
    found = []
    for a in att.maps:
        if a is None:
            continue
        nq, nk = a.shape[-2:]
        keys = layout.added_keys(nq, nk).to(a.device)
        if keys.numel():
            patches = torch.arange(nq - layout.num_patches, nq, device=a.device)
            found.append(a[:, patches][:, :, keys])  # (B, P, K)
    if not found or len({f.shape[-1] for f in found}) != 1:
        return None
    mean = torch.stack(found).mean(dim=0)
    return mean.transpose(1, 2).reshape(mean.shape[0], -1, *layout.grid)


def rollout_layout(att: Attention, view: BackboneView, image_size: tuple[int, int],
                   batch: int) -> tuple[TokenLayout | None, str | None]:
    """The token layout rollout runs on, or None and why rollout does not apply to this model:
    it needs every block's attention over one global token sequence."""
    family = f"the '{view.family}' backbone"
    if all(a is None for a in att.maps):
        return None, (f"{family} has no token attention in its blocks (a CNN, or attention "
                      "that does not call scaled_dot_product_attention); rollout needs it")
    if any(a is None or a.shape[0] != batch for a in att.maps):
        return None, (f"{family} attends within local windows in some blocks (as Swin does) "
                      "and merges patches between stages: rollout multiplies one global "
                      "token-to-token attention through every block, which it does not have")
    queries = {a.shape[-2] for a in att.maps}
    layout = token_layout(view, image_size) or feature_layout(view, image_size, min(queries))
    if layout is None or (len(queries) > 1 and not view.sequence_tokens):
        return None, (f"{family} changes its number of tokens between blocks "
                      f"({sorted(queries)}): rollout needs one token sequence")
    if min(queries) < layout.num_image_tokens:
        return None, f"{family}'s attention does not cover every patch token"
    return layout, None
