"""Multi-head self- and cross-attention sublayers over the backends in ``backends.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from .backends import BACKENDS
from .init import INIT_SCHEMES, BranchInit, zero_bias_

if TYPE_CHECKING:
    from .config import BlockConfig


class LayerKV:
    """Keys and values one self-attention layer has seen so far, ``(batch, seq, heads, head_dim)``."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values; return all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


class KVCache:
    """A ``LayerKV`` per decoder layer, for incremental decoding (``LanguageModel.generate``)."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKV() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return self.layers[0].length


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch-first ``(batch, seq, d_model) -> (batch, seq, d_model)``.

    Self-attention projects queries, keys and values with one fused ``qkv`` matrix (rows
    ``[q; k; v]``, the layout of ``nn.MultiheadAttention.in_proj_weight``); cross-attention has
    ``q`` for the queries and a fused ``kv`` for the memory. ``out`` projects back. With
    ``cfg.qk_norm`` queries and keys are RMS-normalized per head before the dot product
    (QK-norm as in Gemma 3). ``cfg.attn_dropout`` drops attention probabilities in training.
    """

    def __init__(self, cfg: BlockConfig, *, causal: bool = False, cross: bool = False):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.causal, self.cross = causal, cross
        self.backend_name = cfg.attention
        self.backend = BACKENDS[cfg.attention]
        self.attn_dropout = cfg.attn_dropout
        self.init_scheme = cfg.init
        if cross:
            self.q = nn.Linear(d, d, bias=cfg.bias)
            self.kv = nn.Linear(d, 2 * d, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias)
        self.out = nn.Linear(d, d, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """``x``: (batch, seq, d_model). Cross-attention reads ``memory`` (batch, mem_seq, d_model).

        With a ``cache`` (self-attention only) the keys and values of ``x`` are appended to it and
        the queries attend to everything cached, causally aligned to the end.
        """
        if self.cross:
            if memory is None:
                raise ValueError("cross-attention needs `memory` (the encoder output), got None")
            q = self.q(x)
            k, v = self.kv(memory).chunk(2, dim=-1)
            q_padding_mask, kv_padding_mask = None, memory_padding_mask
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q_padding_mask = kv_padding_mask = padding_mask
        q, k, v = (rearrange(t, "b s (h d) -> b s h d", h=self.n_heads) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            if self.cross or padding_mask is not None:
                raise ValueError("a KV cache works for self-attention without a padding mask")
            k, v = cache.update(k, v)
        out = self.backend(
            q, k, v,
            causal=self.causal,
            q_padding_mask=q_padding_mask,
            kv_padding_mask=kv_padding_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (batch, seq, heads, head_dim)
        return self.out(rearrange(out, "b s h d -> b s (h d)"))

    def extra_repr(self) -> str:
        kind = "cross" if self.cross else ("causal self" if self.causal else "self")
        return f"{kind}-attention, heads={self.n_heads}, head_dim={self.head_dim}, backend={self.backend_name!r}"

    def reset_parameters(self, branch: BranchInit = BranchInit()) -> None:
        """Query/key weights get gain 1; value and output weights the placement's branch gain."""
        scheme = INIT_SCHEMES[self.init_scheme]
        d = self.n_heads * self.head_dim
        if self.cross:
            scheme.linear_(self.q.weight, 1.0, branch.normal)
            scheme.blocks_(self.kv.weight, d, [1.0, branch.gain], branch.normal)
            projections = (self.q, self.kv, self.out)
        else:
            scheme.blocks_(self.qkv.weight, d, [1.0, 1.0, branch.gain], branch.normal)
            projections = (self.qkv, self.out)
        scheme.linear_(self.out.weight, branch.gain, branch.normal)
        for linear in projections:
            zero_bias_(linear)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
