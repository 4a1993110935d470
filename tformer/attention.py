"""Multi-head self- and cross-attention sublayers over the backends in ``backends.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from .backends import BACKENDS, attention_mask
from .errors import ConfigError
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
    ``qk_norm`` queries and keys are RMS-normalized per head before the dot product (QK-norm as
    in Gemma 3). ``dropout`` drops attention probabilities in training. ``backend`` names an
    attention kernel of ``tformer.BACKENDS``; ``init`` a scheme of ``tformer.INIT_SCHEMES``.

    The call signature blocks rely on (and a drop-in replacement must accept):
    ``attn(x, padding_mask=...)`` for self-attention, ``attn(x, memory=..., memory_padding_mask=...)``
    for cross-attention, plus ``cache=`` while decoding with a KV cache.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        init: str = "xavier",
    ):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        d = self.d_model = d_model
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.causal, self.cross = causal, cross
        self.backend_name = backend
        self.backend = BACKENDS[backend]
        self.attn_dropout = dropout
        INIT_SCHEMES.get_or_raise(init)
        self.init_scheme = init
        if cross:
            self.q = nn.Linear(d, d, bias=bias)
            self.kv = nn.Linear(d, 2 * d, bias=bias)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.out = nn.Linear(d, d, bias=bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @classmethod
    def from_config(cls, cfg: BlockConfig, *, causal: bool = False, cross: bool = False) -> MultiHeadAttention:
        """The attention a ``BlockConfig`` describes."""
        return cls(cfg.d_model, cfg.n_heads, causal=causal, cross=cross, bias=cfg.use_attn_bias,
                   dropout=cfg.attn_dropout, backend=cfg.attention, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                   init=cfg.init)

    def _project(self, x: Tensor, memory: Tensor | None, padding_mask: Tensor | None,
                 memory_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Queries, keys, values ``(batch, len, heads, head_dim)`` and the query / key padding masks."""
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
        return q, k, v, q_padding_mask, kv_padding_mask

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
        q, k, v, q_padding_mask, kv_padding_mask = self._project(x, memory, padding_mask, memory_padding_mask)
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

    @torch.no_grad()
    def attention_probs(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention probabilities this module computes for ``x``: ``(batch, heads, q_len, kv_len)``.

        Same projections, QK-norm and masks as ``forward`` (``attention_mask``), in float32; for
        analysis (the monitor's attention entropy), O(S^2) memory.
        """
        q, k, _, _, kv_padding_mask = self._project(x, memory, padding_mask, memory_padding_mask)
        q_len, kv_len = q.shape[1], k.shape[1]
        mask, is_causal = attention_mask(q_len, kv_len, causal=self.causal, kv_padding_mask=kv_padding_mask,
                                         device=q.device)
        if is_causal:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * self.head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)

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
