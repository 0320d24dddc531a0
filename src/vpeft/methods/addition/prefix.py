"""Prefix-tuning (Li & Liang, 2021, arXiv:2101.00190) for Vision Transformers.

Every attention layer gets ``P`` learned key and value vectors put in front of its own:
``softmax(q [K_p; K]^T * scale) [V_p; V]``. The queries, and so the token sequence the head reads,
are unchanged. ``P`` must be at least 1 (``P = 0`` would train the head only).

Li & Liang train the prefixes through a reparameterisation, ``[K_p; V_p] = MLP(E)`` with a small
embedding ``E`` (P x D) and an MLP ``D -> hidden -> L * 2 * D``, for stability, and keep only the
resulting prefixes. Here ``reparam_hidden > 0`` trains through that MLP (saved with the adapter, so
training can resume); :func:`export_prefixes` then computes the final prefixes, drops the MLP and
rewrites the adapter's config to ``reparam_hidden=0`` so that a later ``save`` writes exactly the
``L * 2 * P * D`` prefix values and loads into a model adapted with the direct form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.attention import attend, check_attention, pad_mask, project_out, project_qkv
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.state import get_state
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register

ENCODER = "prefix_encoder"  # where the reparameterisation MLP lives on the root model


@dataclass
class PrefixConfig(MethodConfig):
    num_tokens: int = option(10, "Prefix length P (keys and values per layer), >= 1.")
    reparam_hidden: int = option(0, "Hidden width of the reparameterisation MLP (Li & Liang use "
                                    "512); 0 = learn the prefixes directly.")
    init_std: float = option(0.02, "Std of the normal init of direct prefixes (or of E).")

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"prefix num_tokens must be >= 1 (0 would train the head only and "
                             f"not be prefix-tuning), got {self.num_tokens}")
        if self.reparam_hidden < 0:
            raise ValueError(f"prefix reparam_hidden must be >= 0, got {self.reparam_hidden}")


class PrefixEncoder(nn.Module):
    """``MLP(E)``: ``E`` (P x D) -> tanh(Linear(D, h)) -> Linear(h, layers * 2 * A)."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, layers: int, attn_dim: int,
                 init_std: float) -> None:
        super().__init__()
        self.attn_dim = attn_dim
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim) * init_std)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, layers * 2 * attn_dim)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (each P x A) of layer ``i``, from that layer's rows of ``up`` only."""
        rows = slice(2 * i * self.attn_dim, 2 * (i + 1) * self.attn_dim)
        h = torch.tanh(self.down(self.embedding))
        kv = nn.functional.linear(h, self.up.weight[rows], self.up.bias[rows])
        return kv.chunk(2, dim=-1)


class PrefixAttention(Wrapper):
    """timm Attention with ``P`` extra keys/values: learned here, or layer ``index`` of an encoder.

    The encoder is shared by all layers and registered once on the root model, so it is kept out
    of this module's children (a plain attribute), or the state dict would list it ``L`` times.
    """

    def __init__(self, base: nn.Module, num_tokens: int, init_std: float,
                 encoder: PrefixEncoder | None = None, index: int = 0) -> None:
        super().__init__(base)
        self.num_tokens, self.index = num_tokens, index
        self.__dict__["encoder"] = encoder
        if encoder is None:
            dim = base.num_heads * base.head_dim
            self.prefix_k = nn.Parameter(torch.randn(num_tokens, dim) * init_std)
            self.prefix_v = nn.Parameter(torch.randn(num_tokens, dim) * init_std)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is not None:
            return self.encoder.layer(self.index)
        return self.prefix_k, self.prefix_v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        attn, (B, N, _) = self.base, x.shape
        q, k, v = project_qkv(attn, x)  # (B, h, N, d)
        pk, pv = (t.to(x.dtype).view(1, self.num_tokens, attn.num_heads, attn.head_dim)
                  .transpose(1, 2).expand(B, -1, -1, -1) for t in self.prefixes())
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, h, P + N, d)
        mask = pad_mask(attn_mask, is_causal, N, self.num_tokens, x.device)
        return project_out(attn, attend(attn, q, k, v, mask), x)


@register
class Prefix(Method):
    """Prefix-tuning: learned key/value prefixes in every attention layer."""

    name = "prefix"
    config_cls = PrefixConfig
    family = "addition"
    subfamily = "prefix"
    no_decay = ("*prefix_k", "*prefix_v", f"{ENCODER}.embedding")

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "attn", "sequence_tokens", method=self.name)
        cfg: PrefixConfig = self.config
        attns = [view.block_part(i, "attn") for i in range(view.depth)]
        for path in attns:
            check_attention(model.get_submodule(path), self.name)
        encoder = None
        if cfg.reparam_hidden:
            first = model.get_submodule(attns[0])
            encoder = PrefixEncoder(cfg.num_tokens, view.embed_dim, cfg.reparam_hidden, view.depth,
                                    first.num_heads * first.head_dim, cfg.init_std)
            model.add_module(ENCODER, encoder)
        for i, path in enumerate(attns):
            wrap(model, path, lambda a, i=i: PrefixAttention(a, cfg.num_tokens, cfg.init_std,
                                                             encoder, i))


@torch.no_grad()
def export_prefixes(model: nn.Module) -> nn.Module:
    """Replace the reparameterisation MLP by the prefixes it computes (in place); see module doc.

    Afterwards the adapter's config says ``reparam_hidden=0``, so :func:`vpeft.save` writes only
    the prefixes and :func:`vpeft.load` rebuilds them without the MLP.
    """
    state = get_state(model)
    if state.config.method != Prefix.name:
        raise ValueError(f"export_prefixes needs a prefix-tuned model, not '{state.config.method}'")
    if not hasattr(model, ENCODER):
        return model  # already direct
    for name, m in list(model.named_modules()):
        if isinstance(m, PrefixAttention):
            k, v = m.prefixes()
            m.prefix_k, m.prefix_v = nn.Parameter(k.clone()), nn.Parameter(v.clone())
            m.__dict__["encoder"] = None
            state.added_keys |= {f"{name}.prefix_k", f"{name}.prefix_v"}
    delattr(model, ENCODER)
    state.added_keys = {k for k in state.added_keys if not k.startswith(ENCODER + ".")}
    state.config = state.config.replace(reparam_hidden=0)
    state.method.config = state.config
    return model
