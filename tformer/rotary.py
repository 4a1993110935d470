"""Rotary position embeddings (Su et al. 2021, RoFormer) in the half-split layout of Llama and GPT-NeoX.

A head vector ``x`` of even size ``d`` at position ``p`` becomes ``x * cos(p w) + rotate_half(x) * sin(p w)``
with frequencies ``w_i = base^(-2i/d)`` repeated over both halves and ``rotate_half(x) = [-x2, x1]``
(``x1``, ``x2`` the first and second halves): Hugging Face's ``apply_rotary_pos_emb``. Angles are
computed in float32 (float64 for float64 inputs, where Hugging Face stays in float32), then
``cos`` and ``sin`` are cast to ``x``'s dtype and the rotation runs in it, as Hugging Face does.

``rotate`` gives the same values bit for bit as that formula with fewer passes over memory: the
rotation is written as two products and one subtraction / addition per half into a fresh output,
and its backward is the inverse rotation (``cos``, ``-sin``), so only ``cos`` and ``sin`` are saved
for it, not the input. Measured in ``benchmarks/modern_blocks.py`` (a block's training step with
rotary positions against the same block without).
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


def rotate_composite(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin``: the textbook formula (Hugging Face's), kept as the reference
    ``rotate`` is tested against and as the route under ``torch.compile`` (which fuses it itself)."""
    return x * cos + rotate_half(x) * sin


def _turn(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """``x`` turned by the angles whose ``cos`` / ``sin`` (duplicated over both halves) are given, or by
    their negatives (``inverse``), into a new contiguous tensor: per half ``x1 c - x2 s`` and ``x2 c + x1 s``,
    each product rounded once as in ``rotate_composite`` (negation is exact), so the values are the same."""
    half = x.shape[-1] // 2
    out = torch.mul(x, cos)  # [x1 c, x2 c]
    swapped = torch.mul(x, sin)  # [x1 s, x2 s]
    if inverse:
        out[..., :half].add_(swapped[..., half:])
        out[..., half:].sub_(swapped[..., :half])
    else:
        out[..., :half].sub_(swapped[..., half:])
        out[..., half:].add_(swapped[..., :half])
    return out


class _Rotate(torch.autograd.Function):
    """Rotation with the inverse rotation as its backward (a rotation's Jacobian is orthogonal)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _turn(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _turn(grad, cos, sin, inverse=True), None, None


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``cos`` / ``sin`` from ``rotary_cos_sin(_at)`` (the same angles in
    both halves), same values as ``rotate_composite``: in two passes forward and two backward."""
    if torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad:
        return rotate_composite(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, cos, sin)
    return _turn(x, cos, sin, inverse=False)


def apply_rotary(x: Tensor, offset: int, base: float) -> Tensor:
    """Rotate ``x`` of shape ``(batch, seq, heads, head_dim)`` for positions ``offset .. offset + seq - 1``."""
    return rotate(x, *rotary_cos_sin(x, offset, base))


def rotary_cos_sin_at(positions: Tensor, x: Tensor, base: float) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` for ``x`` of shape ``(batch, seq, heads, head_dim)`` whose tokens sit at
    ``positions`` (shape ``(seq,)``, e.g. a packed batch's columns), shaped and typed as ``rotary_cos_sin``'s."""
    cos, sin = rotary_angles(positions, x.shape[-1], base, torch.promote_types(x.dtype, torch.float32))
    return cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
