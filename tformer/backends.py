"""Attention kernels behind one signature, and the ``attention=`` registry.

Every backend computes softmax attention with the same semantics::

    out = backend(q, k, v, causal=..., q_padding_mask=..., kv_padding_mask=..., dropout_p=..., scale=...)

with ``q`` of shape ``(batch, q_len, heads, head_dim)``, ``k``/``v`` of shape
``(batch, kv_len, heads, head_dim)`` and ``out`` shaped like ``q``. Padding masks are
``(batch, len)`` bool tensors, True at padding. Causal masking is aligned bottom-right (query
``i`` sits at absolute position ``kv_len - q_len + i``), which is the usual top-left mask when
``q_len == kv_len`` and what incremental decoding with a cache needs.

No query row is ever left with nothing to attend to, so no backend produces NaN:

* causal + padding: a real query attends to the real keys of its causal window (its own position
  among them); a padding query to its whole causal window, padding included (a finite, meaningless
  output, the same as plain causal attention gives it). Right padding needs no
  mask at all: a real query's causal window holds only real keys, so it runs as plain causal
  attention (``is_causal``, O(S) memory); other padding needs a ``(batch, 1, q_len, kv_len)`` mask,
  which stacks avoid by packing (``tformer.packing``);
* a sequence whose keys are all padding attends over all of them, and for cross-attention
  (``q_padding_mask=None``) its output is set to zero, so it never depends on the padding.

Backends:

* ``math``: explicit ``softmax(q k^T * scale) v``, the readable reference (O(S^2) memory).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CPU it runs PyTorch's flash
  kernel (``_scaled_dot_product_flash_attention_for_cpu``, O(S) memory) with no mask, with
  ``is_causal``, and with a bool mask; the padding mask is passed as ``(batch, 1, 1, kv_len)``,
  broadcast, not materialized per query (causal + padding needs ``(batch, 1, q_len, kv_len)``).
* ``xformers``: ``xformers.ops.memory_efficient_attention`` in its native ``(batch, seq, heads,
  dim)`` layout, ``LowerTriangularMask`` for causal attention, and for padded batches the
  non-padding tokens packed into one sequence with a block-diagonal bias
  (``BlockDiagonalMask`` / ``BlockDiagonalCausalMask``), so no compute or memory goes to padding.
  CUDA only: xformers is imported lazily, on first use.
* ``auto``: ``xformers`` where it can run (CUDA tensor, fp16/bf16/fp32, a working xformers
  build), else ``sdpa``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .registry import Registry

AttentionFn = Callable[..., Tensor]
BACKENDS: Registry[AttentionFn] = Registry("attention backend", field="attention")


class BackendUnavailableError(ConfigError, RuntimeError):
    """``attention='xformers'`` asked for where xformers cannot run (no CUDA tensor, no working build): a
    ``ConfigError`` naming the field and saying what to use instead; a ``RuntimeError`` as it always was."""


def check_causal_lengths(causal: bool, q_len: int, kv_len: int) -> None:
    """Causal masks are aligned bottom-right, which needs at least as many keys as queries."""
    if causal and q_len > kv_len:
        raise ValueError(f"causal attention needs q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")


def attention_mask(
    q_len: int, kv_len: int, *, causal: bool, kv_padding_mask: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The bool mask (True = may attend) for SDPA-style kernels, and whether to pass ``is_causal``.

    Returns ``(None, True)`` for plain causal attention of equal lengths (the kernel builds the
    mask itself), ``(None, False)`` when everything is visible, else a mask broadcastable to
    ``(batch, heads, q_len, kv_len)``.
    """
    check_causal_lengths(causal, q_len, kv_len)
    if kv_padding_mask is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len), False

    keep = ~kv_padding_mask  # (batch, kv_len)
    if not causal:
        keep = keep | ~keep.any(-1, keepdim=True)  # all-padding rows attend everywhere (no NaN)
        return keep[:, None, None, :], False
    if q_len == kv_len and not torch.compiler.is_compiling() and is_right_padded(kv_padding_mask):
        return None, True  # a real query's causal window holds real keys only: no (q_len, kv_len) mask
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(kv_len, device=device)[None, :]
    visible = cols <= rows  # (q_len, kv_len)
    padding_query = kv_padding_mask[:, offset:, None]  # (batch, q_len, 1): sees its whole causal window,
    return visible & (keep[:, None, None, :] | padding_query[:, None]), False  # as is_causal gives it


def is_right_padded(padding_mask: Tensor) -> bool:
    """Whether every row's padding (True) comes after all its real tokens."""
    return not bool((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any())


def _zero_empty_cross_rows(out: Tensor, q_padding_mask: Tensor | None, kv_padding_mask: Tensor | None) -> Tensor:
    if q_padding_mask is None and kv_padding_mask is not None:
        empty = kv_padding_mask.all(-1)  # (batch,)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping of attention scores and logits); ``x`` when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


@BACKENDS.register("math")
def math_attention(q, k, v, *, causal=False, q_padding_mask=None, kv_padding_mask=None, dropout_p=0.0, scale=None,
                   softcap=None):
    """Explicit ``softmax(q k^T * scale) v``: the reference every backend is tested against.

    ``softcap``: soft-capped scores ``softcap * tanh(scores / softcap)`` before masking (Gemma 2's
    attention logit soft-capping); only this backend computes it.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    mask, is_causal = attention_mask(q_len, kv_len, causal=causal, kv_padding_mask=kv_padding_mask, device=q.device)
    if is_causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
    scores = soft_cap(torch.einsum("bqhd,bkhd->bhqk", q, k) * _default_scale(q, scale), softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return _zero_empty_cross_rows(out, q_padding_mask, kv_padding_mask)


@BACKENDS.register("sdpa")
def sdpa_attention(q, k, v, *, causal=False, q_padding_mask=None, kv_padding_mask=None, dropout_p=0.0, scale=None):
    """PyTorch's ``scaled_dot_product_attention`` (flash kernel on CPU, also with padding masks). Takes grouped
    key/value heads as they are (``k``, ``v`` with fewer heads than ``q``: ``enable_gqa``, no repeat)."""
    mask, is_causal = attention_mask(
        q.shape[1], k.shape[1], causal=causal, kv_padding_mask=kv_padding_mask, device=q.device
    )
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )  # (batch, heads, q_len, head_dim)
    return _zero_empty_cross_rows(out.transpose(1, 2), q_padding_mask, kv_padding_mask)


XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def xformers_unavailable_reason(device: torch.device) -> str | None:
    """Why ``memory_efficient_attention`` cannot run on ``device`` (None if it can). Cached per device."""
    if device.type != "cuda":
        return f"xformers' memory_efficient_attention needs CUDA tensors, got device {device.type!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from xformers.ops import memory_efficient_attention
        probe = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        memory_efficient_attention(probe, probe, probe)
    except Exception as error:  # any failure (import, missing CUDA extension, no operator) means "cannot run"
        return f"xformers is not usable on {device}: {type(error).__name__}: {str(error).splitlines()[0]}"
    return None


class XFormersAttention:
    """``xformers.ops.memory_efficient_attention`` with padding turned into packed block-diagonal batches.

    ``kernel`` is looked up lazily; tests on CPU set it to a reference implementation of the
    kernel's documented semantics, which exercises the layout, packing and bias conversion here.
    """

    def __init__(self):
        self.kernel: Callable[..., Tensor] | None = None

    def resolve_kernel(self, device: torch.device) -> Callable[..., Tensor]:
        if self.kernel is not None:
            return self.kernel
        reason = xformers_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"attention='xformers' cannot run: {reason}. Use attention='auto' or 'sdpa'.")
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention

    def __call__(self, q, k, v, *, causal=False, q_padding_mask=None, kv_padding_mask=None, dropout_p=0.0, scale=None):
        kernel = self.resolve_kernel(q.device)
        from xformers.ops.fmha import attn_bias as xbias

        q_len, kv_len = q.shape[1], k.shape[1]
        check_causal_lengths(causal, q_len, kv_len)
        if kv_padding_mask is None and q_padding_mask is None:
            bias = None
            if causal and q_len > 1:
                bias = xbias.LowerTriangularMask() if q_len == kv_len else xbias.LowerTriangularFromBottomRightMask()
            return kernel(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
        return self._packed(kernel, xbias, q, k, v, causal, q_padding_mask, kv_padding_mask, dropout_p, scale)

    @staticmethod
    def _packed(kernel, xbias, q, k, v, causal, q_padding_mask, kv_padding_mask, dropout_p, scale):
        """Drop the padding, run all sequences as one block-diagonal batch, scatter back (zeros at padding)."""
        batch, q_len = q.shape[:2]
        kv_len = k.shape[1]
        q_keep = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if q_padding_mask is None else ~q_padding_mask
        kv_keep = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device) if kv_padding_mask is None else ~kv_padding_mask
        q_lens, kv_lens = q_keep.sum(1), kv_keep.sum(1)
        live = (q_lens > 0) & (kv_lens > 0)  # sequences with something to attend from and to
        q_keep, kv_keep = q_keep & live[:, None], kv_keep & live[:, None]
        out = q.new_zeros(q.shape)
        if not bool(live.any()):
            return out
        q_seqlens, kv_seqlens = q_lens[live].tolist(), kv_lens[live].tolist()
        if causal:
            bias_cls = xbias.BlockDiagonalCausalMask if q_seqlens == kv_seqlens else xbias.BlockDiagonalCausalFromBottomRightMask
        else:
            bias_cls = xbias.BlockDiagonalMask
        bias = bias_cls.from_seqlens(q_seqlens, kv_seqlens, device=q.device)
        packed = kernel(
            q[q_keep].unsqueeze(0), k[kv_keep].unsqueeze(0), v[kv_keep].unsqueeze(0),
            attn_bias=bias, p=dropout_p, scale=scale,
        )  # (1, total_q_tokens, heads, head_dim)
        return out.index_put((q_keep,), packed[0])


xformers_attention = BACKENDS.register("xformers")(XFormersAttention())


@BACKENDS.register("auto")
def auto_attention(q, k, v, **kwargs):
    """xformers where it can run (CUDA, fp16/bf16/fp32, working build), else SDPA."""
    if resolve_backend("auto", q) == "xformers":
        try:
            return xformers_attention(q, k, v, **kwargs)
        except NotImplementedError:  # no xformers operator for this shape/dtype: SDPA handles it
            pass
    return sdpa_attention(q, k, v, **kwargs)


def resolve_backend(name: str, q: Tensor) -> str:
    """The backend ``name`` runs as for a query like ``q`` (``auto`` resolved)."""
    if name != "auto":
        return name
    if q.is_cuda and q.dtype in XFORMERS_DTYPES and xformers_unavailable_reason(q.device) is None:
        return "xformers"
    return "sdpa"
