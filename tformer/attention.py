"""Multi-head self- and cross-attention sublayers over the backends in ``backends.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

import functools

from .backends import BACKENDS, attention_mask, math_attention, soft_cap
from .errors import ConfigError
from .init import INIT_SCHEMES, BranchInit, zero_bias_
from .rotary import rotary_cos_sin, rotate

if TYPE_CHECKING:
    from .config import BlockConfig


class LayerKV:
    """Keys and values one self-attention layer has seen so far, ``(batch, seq, kv_heads, head_dim)``."""

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


def resolve_qk_norm(value) -> bool | str:
    """``qk_norm`` as ``False``, ``"head"`` or ``"full"`` (``True`` means per head; ``None`` off)."""
    resolved = "head" if value is True else (False if value is None else value)
    if resolved not in (False, "head", "full"):
        raise ConfigError(f"qk_norm={value!r}; valid choices: False, 'head' (True), 'full'")
    return resolved


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch-first ``(batch, seq, d_model) -> (batch, seq, d_model)``.

    Self-attention projects queries, keys and values with one fused ``qkv`` matrix (rows
    ``[q; k; v]``, the layout of ``nn.MultiheadAttention.in_proj_weight``; with ``n_kv_heads <
    n_heads`` the k and v blocks have ``n_kv_heads * head_dim`` rows each); cross-attention has
    ``q`` for the queries and a fused ``kv`` for the memory. ``out`` projects back.

    * ``n_kv_heads``: grouped-query attention (each key/value head serves ``n_heads / n_kv_heads``
      query heads; 1 is multi-query attention); a KV cache stores only the key/value heads.
    * ``qk_norm``: ``"head"`` RMS-normalizes queries and keys per head (Gemma 3, Qwen 3), ``"full"``
      over the whole q / k projection before the head split (OLMo 2); always before rotary positions.
    * ``rope_base``: rotary positions (``tformer.rotary``) on queries and keys of self-attention, at
      the positions after what a KV cache holds; ``None``: no rotary positions.
    * ``head_dim``: the width of each head (``None``: ``d_model / n_heads``); Gemma and Qwen 3 use
      heads whose total width ``n_heads * head_dim`` differs from ``d_model``.
    * ``scale``: the factor on ``q k^T`` (``None``: ``head_dim ** -0.5``; Gemma 2 uses
      ``query_pre_attn_scalar ** -0.5``).
    * ``softcap``: attention logit soft-capping ``softcap * tanh(scores / softcap)`` (Gemma 2). No
      fused kernel computes it, so it runs the ``math`` backend (O(S^2) memory); ``backend`` must be
      ``"auto"`` or ``"math"``.
    * ``dropout`` drops attention probabilities in training; ``backend`` names an attention kernel
      of ``tformer.BACKENDS``; ``init`` a scheme of ``tformer.INIT_SCHEMES``.

    The call signature blocks rely on (and a drop-in replacement must accept):
    ``attn(x, padding_mask=...)`` for self-attention, ``attn(x, memory=..., memory_padding_mask=...)``
    for cross-attention, plus ``cache=`` while decoding with a KV cache.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        causal: bool = False,
        cross: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        qk_norm: bool | str = False,
        norm_eps: float = 1e-5,
        rope_base: float | None = None,
        init: str = "xavier",
    ):
        super().__init__()
        if head_dim is None and d_model % n_heads:
            raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}; give head_dim to choose "
                              f"the head width independently")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ConfigError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        qk_norm = resolve_qk_norm(qk_norm)
        d = self.d_model = d_model
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d // n_heads if head_dim is None else head_dim
        self.scale, self.softcap = scale, softcap
        if softcap is not None and backend not in ("auto", "math"):
            raise ConfigError(f"attention soft-capping (softcap={softcap!r}) runs on the 'math' backend only; "
                              f"got backend={backend!r}: use 'auto' or 'math'")
        if rope_base is not None and (cross or self.head_dim % 2):
            raise ConfigError("rotary positions need self-attention with an even head_dim, "
                              f"got {'cross-attention' if cross else f'head_dim={self.head_dim}'}")
        self.causal, self.cross, self.rope_base = causal, cross, rope_base
        self.backend_name = backend
        self.backend = BACKENDS[backend]
        # soft-capped scores exist only on the math path: the kernel is chosen once, not per call
        self._attend = self.backend if softcap is None else functools.partial(math_attention, softcap=softcap)
        self.attn_dropout = dropout
        INIT_SCHEMES.get_or_raise(init)
        self.init_scheme = init
        kv, q_size = n_kv_heads * self.head_dim, n_heads * self.head_dim
        if cross:
            self.q = nn.Linear(d, q_size, bias=bias)
            self.kv = nn.Linear(d, 2 * kv, bias=bias)
        else:
            self.qkv = nn.Linear(d, q_size + 2 * kv, bias=bias)
        self.out = nn.Linear(q_size, d, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            q_norm_size, k_norm_size = (self.head_dim, self.head_dim) if qk_norm == "head" else (q_size, kv)
            self.q_norm = nn.RMSNorm(q_norm_size, eps=norm_eps)
            self.k_norm = nn.RMSNorm(k_norm_size, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @classmethod
    def from_config(cls, cfg: BlockConfig, *, causal: bool = False, cross: bool = False,
                    rope: bool = False) -> MultiHeadAttention:
        """The attention a ``BlockConfig`` describes (``rope``: rotary positions at ``cfg.rope_base``)."""
        return cls(cfg.d_model, cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, scale=cfg.attn_scale,
                   softcap=cfg.attn_softcap, causal=causal, cross=cross,
                   bias=cfg.use_attn_bias, dropout=cfg.attn_dropout, backend=cfg.attention, qk_norm=cfg.qk_norm,
                   norm_eps=cfg.norm_eps, rope_base=cfg.rope_base if rope else None, init=cfg.init)

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_size(self) -> int:
        """The width of the queries (and of the attention output before ``out``): ``n_heads * head_dim``."""
        return self.n_heads * self.head_dim

    def _project(self, x: Tensor, memory: Tensor | None, padding_mask: Tensor | None,
                 memory_padding_mask: Tensor | None, offset: int = 0):
        """Queries ``(batch, len, heads, head_dim)``, keys and values ``(batch, kv_len, kv_heads, head_dim)``
        (QK-norm and rotary positions applied) and the query / key padding masks."""
        if self.cross:
            if memory is None:
                raise ValueError("cross-attention needs `memory` (the encoder output), got None")
            q = self.q(x)
            k, v = self.kv(memory).chunk(2, dim=-1)
            q_padding_mask, kv_padding_mask = None, memory_padding_mask
        else:
            q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q_padding_mask = kv_padding_mask = padding_mask
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b s (h d) -> b s h d", h=self.n_heads)
        k, v = (rearrange(t, "b s (h d) -> b s h d", h=self.n_kv_heads) for t in (k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            cos, sin = rotary_cos_sin(q, offset, self.rope_base)  # shared by queries and keys
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v, q_padding_mask, kv_padding_mask

    def _expand_kv(self, t: Tensor) -> Tensor:
        """Key/value heads repeated for the query heads they serve (grouped-query attention)."""
        groups = self.n_heads // self.n_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=2)

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
        if cache is not None and (self.cross or padding_mask is not None):
            raise ValueError("a KV cache works for self-attention without a padding mask")
        offset = 0 if cache is None else cache.length
        q, k, v, q_padding_mask, kv_padding_mask = self._project(x, memory, padding_mask, memory_padding_mask, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self._attend(
            q, self._expand_kv(k), self._expand_kv(v),
            causal=self.causal,
            q_padding_mask=q_padding_mask,
            kv_padding_mask=kv_padding_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
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
        k = self._expand_kv(k)
        q_len, kv_len = q.shape[1], k.shape[1]
        mask, is_causal = attention_mask(q_len, kv_len, causal=self.causal, kv_padding_mask=kv_padding_mask,
                                         device=q.device)
        if is_causal:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        scores = soft_cap(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale, self.softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)

    def extra_repr(self) -> str:
        kind = "cross" if self.cross else ("causal self" if self.causal else "self")
        extra = "" if self.n_kv_heads == self.n_heads else f", kv_heads={self.n_kv_heads}"
        extra += f", qk_norm={self.qk_norm!r}" if self.qk_norm else ""
        extra += f", rope_base={self.rope_base:g}" if self.rope_base is not None else ""
        extra += f", scale={self.scale:g}" if self.scale is not None else ""
        extra += f", softcap={self.softcap:g}" if self.softcap is not None else ""
        return f"{kind}-attention, heads={self.n_heads}, head_dim={self.head_dim}{extra}, backend={self.backend_name!r}"

    def reset_parameters(self, branch: BranchInit = BranchInit()) -> None:
        """Query/key weights get gain 1; value and output weights the placement's branch gain."""
        scheme = INIT_SCHEMES[self.init_scheme]
        if self.cross:
            scheme.linear_(self.q.weight, 1.0, branch.normal)
            scheme.blocks_(self.kv.weight, [self.kv_size] * 2, [1.0, branch.gain], branch.normal)
            projections = (self.q, self.kv, self.out)
        else:
            sizes = [self.q_size, self.kv_size, self.kv_size]
            scheme.blocks_(self.qkv.weight, sizes, [1.0, 1.0, branch.gain], branch.normal)
            projections = (self.qkv, self.out)
        scheme.linear_(self.out.weight, branch.gain, branch.normal)
        for linear in projections:
            zero_bias_(linear)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
