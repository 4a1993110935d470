"""Multi-head self- and cross-attention sublayers over the backends in ``backends.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

import functools

from .backends import BACKENDS, attention_mask, math_attention, resolve_backend, soft_cap
from .errors import ConfigError
from .init import INIT_SCHEMES, BranchInit, zero_bias_
from .packing import Packing, packed_attention
from .rotary import rotary_cos_sin, rotary_cos_sin_at, rotate

if TYPE_CHECKING:
    from .config import BlockConfig


class LayerKV:
    """Keys and values one self-attention layer has seen so far, for incremental decoding.

    They live in preallocated buffers ``keys`` / ``values`` of shape ``(batch, kv_heads, capacity,
    head_dim)``: only the key/value heads (grouped-query attention stores ``n_kv_heads``, not
    ``n_heads``), head-major, so ``keys[:, :, :length]`` is a view SDPA reads in place. ``update``
    writes the new positions into the buffers (no copy of what is cached). The buffers are allocated at
    the first update with ``capacity`` positions (None: as many as that update brings); an update past
    the capacity reallocates them to ``max(needed, 2 * capacity)`` positions (geometric growth:
    amortized O(1) copies per position). ``k`` / ``v`` are the cached ``(batch, length, kv_heads,
    head_dim)`` views.
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity={capacity!r} must be None or a positive int")
        self.initial_capacity = capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        #: how many positions are cached (a plain attribute: read at every step)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k`` and ``v`` (batch, new, kv_heads, head_dim) after the cached positions; return every
        cached key and value as views ``(batch, kv_heads, length, head_dim)`` of the buffers."""
        start = self.length
        end = start + k.shape[1]
        keys, values = self.keys, self.values
        if keys is None or end > keys.shape[2]:
            keys, values = self._reserve(k, end)
        elif k.shape[0] != keys.shape[0]:
            raise ValueError(f"the KV cache holds a batch of {keys.shape[0]}, got keys for {k.shape[0]}")
        keys[:, :, start:end] = k.transpose(1, 2)
        values[:, :, start:end] = v.transpose(1, 2)
        self.length = end
        return keys[:, :, :end], values[:, :, :end]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values; return all of them, ``(batch, length, kv_heads, head_dim)`` views."""
        keys, values = self.append(k, v)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def _reserve(self, k: Tensor, needed: int) -> tuple[Tensor, Tensor]:
        """Buffers for at least ``needed`` positions shaped for keys like ``k``, the cached ones copied over."""
        batch, _, heads, head_dim = k.shape
        if self.keys is None:
            capacity = max(needed, self.initial_capacity or 0)
        else:
            if (batch, heads, head_dim) != (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]):
                raise ValueError(f"the KV cache holds (batch, kv_heads, head_dim) = "
                                 f"{(self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])}, got keys of "
                                 f"{(batch, heads, head_dim)}")
            capacity = max(needed, 2 * self.keys.shape[2])
        keys = k.new_empty(batch, heads, capacity, head_dim)
        values = k.new_empty(batch, heads, capacity, head_dim)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    @property
    def capacity(self) -> int:
        """How many positions the buffers hold (0 before the first update)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """The bytes of the key and value buffers."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def k(self) -> Tensor | None:
        return None if self.keys is None else self.keys[:, :, : self.length].transpose(1, 2)

    @property
    def v(self) -> Tensor | None:
        return None if self.values is None else self.values[:, :, : self.length].transpose(1, 2)


class KVCache:
    """A ``LayerKV`` per decoder layer, for incremental decoding (``LanguageModel.generate``).

    ``capacity``: the positions each layer preallocates at its first update (``generate`` passes prompt +
    new tokens, so decoding never reallocates); appending past it grows the buffers geometrically.
    """

    def __init__(self, n_layers: int, capacity: int | None = None):
        self.layers = [LayerKV(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        """How many positions the buffers hold (0 before the first update)."""
        return self.layers[0].capacity

    @property
    def nbytes(self) -> int:
        """The bytes of every layer's key and value buffers: ``2 * layers * batch * capacity * kv_heads *
        head_dim * element size``."""
        return sum(layer.nbytes for layer in self.layers)


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
                 memory_padding_mask: Tensor | None, offset: int = 0, positions: Tensor | None = None):
        """Queries ``(batch, len, heads, head_dim)``, keys and values ``(batch, kv_len, kv_heads, head_dim)``
        (QK-norm and rotary positions applied) and the query / key padding masks. ``positions``: the
        tokens' positions for rotary embeddings (a packed batch's columns), else ``offset`` onwards."""
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
            cos, sin = (rotary_cos_sin(q, offset, self.rope_base) if positions is None
                        else rotary_cos_sin_at(positions, q, self.rope_base))  # shared by queries and keys
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v, q_padding_mask, kv_padding_mask

    def _expand_kv(self, t: Tensor, q: Tensor | None = None) -> Tensor:
        """Key/value heads repeated for the query heads they serve (grouped-query attention), unless the
        kernel that attends to ``q`` takes grouped heads as they are (SDPA: ``enable_gqa``, no copy)."""
        groups = self.n_heads // self.n_kv_heads
        if groups == 1 or (q is not None and self.softcap is None and resolve_backend(self.backend_name, q) == "sdpa"):
            return t
        return t.repeat_interleave(groups, dim=2)

    def _attend_cache(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The output projection of the queries ``q`` (batch, q_len, heads, head_dim) attending over a KV
        cache's keys and values ``(batch, kv_heads, kv_len, head_dim)``, causally aligned to the end.

        The ``auto`` and ``sdpa`` backends read the cache in place: SDPA with ``enable_gqa`` (each key/value
        head serves its group of query heads without being repeated; on CPU the same values as repeating
        them). Soft-capping, ``math`` and ``xformers`` run their backend on the repeated heads.
        """
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.softcap is None and self.backend_name in ("auto", "sdpa"):
            mask, is_causal = attention_mask(q.shape[1], k.shape[2], causal=self.causal, kv_padding_mask=None,
                                             device=q.device)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            ).transpose(1, 2)
        else:
            out = self._attend(q, self._expand_kv(k.transpose(1, 2)), self._expand_kv(v.transpose(1, 2)),
                               causal=self.causal, dropout_p=dropout_p, scale=self.scale)
        return self.out(out.flatten(2))  # (batch, q_len, heads * head_dim)

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerKV | None = None,
        packing: Packing | None = None,
    ) -> Tensor:
        """``x``: (batch, seq, d_model). Cross-attention reads ``memory`` (batch, mem_seq, d_model).

        With a ``cache`` (self-attention only) the keys and values of ``x`` are appended to it and
        the queries attend to everything cached, causally aligned to the end. With a ``packing``
        (``tformer.packing``), ``x`` is a packed batch ``(1, tokens, d_model)`` and each of its
        sequences attends within itself (cross-attention: to its own row of ``memory``).
        """
        if packing is not None:
            if cache is not None or padding_mask is not None:
                raise ValueError("a packed batch takes neither a KV cache nor a padding mask")
            return self._forward_packed(x, packing, memory, memory_padding_mask)
        if cache is not None and (self.cross or padding_mask is not None):
            raise ValueError("a KV cache works for self-attention without a padding mask")
        offset = 0 if cache is None else cache.length
        q, k, v, q_padding_mask, kv_padding_mask = self._project(x, memory, padding_mask, memory_padding_mask, offset)
        if cache is not None:
            return self._attend_cache(q, *cache.append(k, v))
        out = self._attend(
            q, self._expand_kv(k, q), self._expand_kv(v, q),
            causal=self.causal,
            q_padding_mask=q_padding_mask,
            kv_padding_mask=kv_padding_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        )  # (batch, seq, heads, head_dim)
        return self.out(rearrange(out, "b s h d -> b s (h d)"))

    def _forward_packed(self, x: Tensor, packing: Packing, memory: Tensor | None,
                        memory_padding_mask: Tensor | None) -> Tensor:
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.cross:  # queries back in their rows for one masked call over the (padded) memory
            q, k, v, _, kv_padding_mask = self._project(x, memory, None, memory_padding_mask)
            out = packing.pack(self._attend(packing.unpack(q), self._expand_kv(k, q), self._expand_kv(v, q), causal=False,
                                            kv_padding_mask=kv_padding_mask, dropout_p=dropout_p, scale=self.scale))
        else:
            q, k, v, _, _ = self._project(x, None, None, None, positions=packing.positions)
            backend = "math" if self.softcap is not None else resolve_backend(self.backend_name, q)
            out = packed_attention(self._attend, backend, q, self._expand_kv(k, q), self._expand_kv(v, q), packing,
                                   causal=self.causal, dropout_p=dropout_p, scale=self.scale)
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
