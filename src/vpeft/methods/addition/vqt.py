"""Visual Query Tuning (Tu et al., 2023, arXiv:2212.03220): learned queries summarise each layer.

Every block gets ``T`` learned query tokens. They pass through the block with its own weights,
but their attention reads only the keys and values of the block's own tokens (VQT appends columns
to Q only, not to K or V), so the backbone's tokens never see them and stay exactly as they were;
the query outputs are not passed on to the next block. The classifier then reads the pooled
feature (class token, or whatever the backbone pools) concatenated with every block's query
outputs, flattened (the paper's default) or averaged over the ``T`` queries of each block.

How: the block is run once as usual while its attention caches its keys and values, then once on
the queries alone with the attention switched to reading the cache. No gradient flows through the
backbone's own tokens (memory-saving, as the paper stresses).

The head's input grows from ``D`` to ``D + L * T * D`` (``D + L * D`` with ``pool='mean'``), so each
head in ``view.heads`` is re-created: the new Linear copies the old weights onto the pooled feature
and starts at zero on the query features. Its parameters live under the head's path and count as
head parameters (``train_head`` must be True).

As the official code (``NORMALIZE_FEATS=True``), each group of features (the pooled feature, and
each block's flattened or averaged query outputs) is L2-normalised before the head. That changes
what the copied head computes on the pooled feature, so with ``normalize=True`` (the default) the
adapted model does *not* start equal to the base (``zero_init`` is False; for a new task the head
is fresh anyway). ``normalize=False`` keeps the raw features, and then the model starts as the base.
Dropout on the queries is drawn per sample (:func:`~vpeft.core.prompts.expand_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.attention import attend, check_attention, project_out, project_qkv
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.prompts import expand_prompt, init_prompt
from vpeft.core.side import Stash
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class VQTConfig(MethodConfig):
    num_tokens: int = option(10, "Query tokens T per block.")
    pool: str = option("concat", "How the head reads each block's T query outputs: 'concat' "
                                 "(flatten, the paper's default) or 'mean'.")
    dropout: float = option(0.0, "Dropout on the query tokens, a mask per sample (the official "
                                 "scripts use 0.1).")
    normalize: bool = option(True, "L2-normalise each feature group (pooled feature, each block's "
                                   "queries) before the head, as the official code; True means "
                                   "the model does not start equal to the base.")

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"vqt num_tokens must be >= 1, got {self.num_tokens}")
        if self.pool not in ("concat", "mean"):
            raise ValueError(f"vqt pool must be 'concat' or 'mean', got {self.pool!r}")
        if not self.train_head:
            raise ValueError("vqt re-creates the classifier head: train_head must be True")


class CachedKVAttention(Wrapper):
    """timm Attention that records its keys/values, or reads recorded ones (``cross`` mode)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.cross = False
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = project_qkv(self.base, x)
        if self.cross:  # x are the queries: attend over the block's tokens only
            k, v = self.kv
        else:
            self.kv = (k, v)
            if is_causal:
                attn_mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool,
                                       device=x.device).tril_()
        return project_out(self.base, attend(self.base, q, k, v, None if self.cross else attn_mask),
                           x)


class QueryBlock(Wrapper):
    """A block that also runs its ``T`` query tokens and appends their outputs to ``outputs``."""

    def __init__(self, base: nn.Module, attn_path: str, query: torch.Tensor, dropout: float,
                 outputs: Stash, first: bool) -> None:
        super().__init__(base)
        self.attn_path, self.first = attn_path, first
        self.query = nn.Parameter(query)
        self.dropout = dropout
        self.__dict__["outputs"] = outputs  # shared with the heads; not a module attribute

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attn: CachedKVAttention = self.base.get_submodule(self.attn_path)
        if self.first:
            self.outputs.clear()  # a new forward pass starts
        out = self.base(x, *args, **kwargs)
        attn.cross = True
        try:
            queries = expand_prompt(self.query, x.shape[0], self.dropout, self.training, x.dtype)
            self.outputs.append(self.base(queries))  # (B, T, D)
        finally:
            attn.cross, attn.kv = False, None
        return out


class QueryHead(Wrapper):
    """``base([pooled, queries of block 1 .. L])`` with ``base`` the new, wider Linear."""

    def __init__(self, base: nn.Linear, outputs: Stash, pool: str, normalize: bool) -> None:
        super().__init__(base)
        self.pool, self.normalize = pool, normalize
        self.__dict__["outputs"] = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.outputs:
            raise RuntimeError("VQT head called without query features: run the whole model")
        feats = [x, *(q.mean(1) if self.pool == "mean" else q.flatten(1) for q in self.outputs)]
        if self.normalize:  # one unit vector per group: (B, D), (B, T * D) ...
            feats = [F.normalize(f, dim=-1) for f in feats]
        return self.base(torch.cat(feats, dim=-1))


def widen_head(head: nn.Linear, extra: int) -> nn.Linear:
    """A Linear with ``extra`` more inputs: old weights first, zeros on the new inputs."""
    new = nn.Linear(head.in_features + extra, head.out_features, bias=head.bias is not None)
    new = new.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : head.in_features] = head.weight
        if head.bias is not None:
            new.bias.copy_(head.bias)
    return new


@register
class VQT(Method):
    """VQT: per-block query tokens summarise intermediate features for a wider linear head."""

    name = "vqt"
    config_cls = VQTConfig
    family = "addition"
    subfamily = "prompt"
    memory_saving = True
    no_decay = ("*query",)

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        return not self.config.normalize

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "attn", "sequence_tokens", "heads", method=self.name)
        cfg: VQTConfig = self.config
        outputs = Stash()
        for i in range(view.depth):
            check_attention(model.get_submodule(view.block_part(i, "attn")), self.name)
            wrap(model, view.block_part(i, "attn"), CachedKVAttention)
            # VPT's uniform init with the patch/width fan (the official code reuses it)
            query = init_prompt(cfg.num_tokens, view.block_dims[i], view)
            wrap(model, view.blocks[i], lambda b, q=query, i=i: QueryBlock(
                b, view.attn, q, cfg.dropout, outputs, first=i == 0))
        per_block = 1 if cfg.pool == "mean" else cfg.num_tokens
        extra = sum(per_block * d for d in view.block_dims)
        for path in view.heads:
            head = model.get_submodule(path)
            if not isinstance(head, nn.Linear):
                raise ValueError(f"vqt re-creates Linear heads; {path} is {type(head).__name__}")
            wrap(model, path, lambda h: QueryHead(widen_head(h, extra), outputs, cfg.pool,
                                                           cfg.normalize))

    def block_switched_off(self, model: nn.Module, view: BackboneView, i: int) -> None:
        """Without block ``i``'s queries the head reads one group fewer: drop its columns, and
        let the next remaining query block start the forward pass's outputs if ``i`` did."""
        blocks = [(j, m) for j, b in enumerate(view.blocks)
                  if isinstance(m := model.get_submodule(b), QueryBlock)]
        if blocks and not any(m.first for _, m in blocks):
            blocks[0][1].first = True
        per_block = 1 if self.config.pool == "mean" else self.config.num_tokens
        for path in view.heads:
            head: QueryHead = model.get_submodule(path)
            linear = head.base
            start = linear.in_features - sum(per_block * d for d in view.block_dims)
            start += sum(per_block * d for d in view.block_dims[:i])
            keep = torch.ones(linear.in_features, dtype=torch.bool)
            keep[start:start + per_block * view.block_dims[i]] = False
            narrow = nn.Linear(int(keep.sum()), linear.out_features, linear.bias is not None)
            narrow = narrow.to(device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                narrow.weight.copy_(linear.weight[:, keep])
                if linear.bias is not None:
                    narrow.bias.copy_(linear.bias)
            head.base = narrow
