"""Padding-free execution: a padded batch packed once into its real tokens, and attention over them.

A stack that gets a padding mask packs its input at the entry (``Packing.pack``: the real tokens of
every row, in order, as one ``(1, tokens, d_model)`` row), runs every block on those tokens only
and scatters the result back at the exit (``Packing.unpack``: zeros at padding). Projections,
feed-forward and norms then do no work for padding, and batch-statistics norms (PowerNorm,
BatchNorm) see exactly the real tokens with no mask. Attention keeps the sequences apart
(``packed_attention``): xformers' block-diagonal bias on CUDA (built once per packing, shared by
every layer), elsewhere each sequence attends on its own slice of the packed tokens through the
configured backend with no mask at all (``is_causal`` for causal attention), so memory is O(S)
whatever the padding. Rotary positions use each token's column in the padded batch, so outputs
at real positions equal the padded path's (to float rounding) for any padding, left, right or
in between.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


class Packing:
    """Where the real tokens of a padded ``(batch, seq)`` batch sit in its packed ``(1, tokens)`` row.

    ``index``: flat positions (``row * seq + column``) of the real tokens, row-major; ``seqlens``:
    real tokens per row (0 for an all-padding row), whose tokens follow each other in the packed row;
    ``positions``: each real token's column (for rotary positions).
    """

    def __init__(self, padding_mask: Tensor):
        if padding_mask.dim() != 2 or padding_mask.dtype != torch.bool:
            raise ValueError(f"a padding mask is a (batch, seq) bool tensor, got {padding_mask.dtype} of shape "
                             f"{tuple(padding_mask.shape)}")
        self.batch, self.seq = padding_mask.shape
        keep = ~padding_mask
        self.index = keep.reshape(-1).nonzero().squeeze(1)
        self.seqlens: list[int] = keep.sum(1).tolist()
        self.positions = self.index % self.seq
        self.tokens = len(self.index)
        self._biases: dict = {}

    def pack(self, x: Tensor) -> Tensor:
        """``(batch, seq, ...)`` -> ``(1, tokens, ...)``: the real tokens, row by row."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, y: Tensor) -> Tensor:
        """``(1, tokens, ...)`` -> ``(batch, seq, ...)`` with zeros at padding (differentiable)."""
        flat = y.new_zeros(self.batch * self.seq, *y.shape[2:]).index_copy(0, self.index, y[0])
        return flat.reshape(self.batch, self.seq, *y.shape[2:])

    def xformers_bias(self, causal: bool, device: torch.device):
        """xformers' block-diagonal (causal) bias for these sequences, built once per packing and device."""
        key = (causal, str(device))
        if key not in self._biases:
            from xformers.ops.fmha import attn_bias as xbias

            lens = [n for n in self.seqlens if n]
            cls = xbias.BlockDiagonalCausalMask if causal else xbias.BlockDiagonalMask
            self._biases[key] = cls.from_seqlens(lens, device=device)
        return self._biases[key]

    def __repr__(self) -> str:
        return f"Packing(batch={self.batch}, seq={self.seq}, tokens={self.tokens})"


def should_pack(padding_mask: Tensor | None) -> bool:
    """Whether a stack gains from packing: there is a padding mask and it marks some padding."""
    return padding_mask is not None and bool(padding_mask.any())


def packed_attention(attend: Callable[..., Tensor], backend: str, q: Tensor, k: Tensor, v: Tensor,
                     packing: Packing, *, causal: bool, dropout_p: float, scale: float | None) -> Tensor:
    """Attention of packed ``q``, ``k``, ``v`` (``(1, tokens, heads, head_dim)``), each sequence on its own.

    ``attend`` is the backend function; ``backend`` its resolved name (``"xformers"`` runs one
    call with the block-diagonal bias, anything else one call per sequence with no mask).
    """
    if backend == "xformers":
        from .backends import xformers_attention

        kernel = xformers_attention.resolve_kernel(q.device)
        return kernel(q, k, v, attn_bias=packing.xformers_bias(causal, q.device), p=dropout_p, scale=scale)
    call = functools.partial(attend, causal=causal, dropout_p=dropout_p, scale=scale)
    lengths = [n for n in packing.seqlens if n]  # split, not slices: its backward is one cat, not a zero-fill each
    parts = [call(*qkv) for qkv in zip(*(t.split(lengths, dim=1) for t in (q, k, v)))]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
