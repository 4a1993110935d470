"""Rotary position embeddings (Su et al. 2021, RoFormer) in the half-split layout of Llama and GPT-NeoX.

A head vector ``x`` of even size ``d`` at position ``p`` becomes ``x * cos(p w) + rotate_half(x) * sin(p w)``
with frequencies ``w_i = base^(-2i/d)`` repeated over both halves and ``rotate_half(x) = [-x2, x1]``
(``x1``, ``x2`` the first and second halves): Hugging Face's ``apply_rotary_pos_emb``. Angles are
computed in float32 (float64 for float64 inputs, where Hugging Face stays in float32), then
``cos`` and ``sin`` are cast to ``x``'s dtype and the rotation runs in it, as Hugging Face does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, base: float,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of shape ``(len(positions), head_dim)`` in ``dtype``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(dtype) / head_dim
    inv_freq = 1.0 / (base**exponents)
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]  # (seq, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_cos_sin(x: Tensor, offset: int, base: float) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` for ``x`` of shape ``(batch, seq, heads, head_dim)`` at positions ``offset ..
    offset + seq - 1``, shaped ``(seq, 1, head_dim)`` to broadcast over heads, in ``x``'s dtype."""
    return rotary_cos_sin_at(torch.arange(offset, offset + x.shape[1], device=x.device), x, base)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def apply_rotary(x: Tensor, offset: int, base: float) -> Tensor:
    """Rotate ``x`` of shape ``(batch, seq, heads, head_dim)`` for positions ``offset .. offset + seq - 1``."""
    return rotate(x, *rotary_cos_sin(x, offset, base))


def rotary_cos_sin_at(positions: Tensor, x: Tensor, base: float) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` for ``x`` of shape ``(batch, seq, heads, head_dim)`` whose tokens sit at
    ``positions`` (shape ``(seq,)``, e.g. a packed batch's columns), shaped and typed as ``rotary_cos_sin``'s."""
    cos, sin = rotary_angles(positions, x.shape[-1], base, torch.promote_types(x.dtype, torch.float32))
    return cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
