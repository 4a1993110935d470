"""The C kernels of DyT, ScaleNorm, AdaNorm and PowerNorm (``tformer/kernels/norms.c``) as autograd
Functions (eager) and PyTorch custom ops (``torch.compile``), and when each norm takes them.

A norm takes its kernel on the CPU when the input and its parameters are float32 or float64 tensors
of one dtype and the kernels are available (``tformer.kernels``); otherwise its pure-PyTorch route
runs, with the same results to rounding. Each route here computes what the composite in
``tformer.norms``/``tformer.powernorm`` computes, gradients included, in one pass over memory
forward and one backward (PowerNorm: two forward, as its batch statistic needs all tokens first).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels


_kernels_available = kernels.available


def takes_kernel(x: Tensor, *params: Tensor | None) -> bool:
    """True when ``x`` and ``params`` (None skipped) can go to the C kernels: CPU tensors, one
    kernel dtype, parameters contiguous, and the kernels built."""
    if x.device.type != "cpu" or x.dtype not in kernels.KERNEL_DTYPES or x.dim() == 0:
        return False
    for p in params:
        if p is not None and (p.device.type != "cpu" or p.dtype != x.dtype or not p.is_contiguous()):
            return False
    return _kernels_available()


# ---- DyT: weight * tanh(alpha * x) + bias ------------------------------------------------------

#: The forward keeps ``tanh(alpha * x)`` for the backward (one more tensor, as the composite keeps)
#: rather than computing it again there: measured faster at (8, 256, 512), where tanh's arithmetic is
#: most of the time; set False to trade that time for the memory.
DYT_KEEP_TANH = True


class _DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y, t = kernels.dyt_forward(x, alpha, weight, bias, DYT_KEEP_TANH)
        ctx.save_for_backward(x, t, alpha, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, t, alpha, weight = ctx.saved_tensors
        grad_x, grad_alpha, grad_w, grad_b = kernels.dyt_backward(grad_y.contiguous(), x, t, alpha, weight)
        return grad_x, grad_alpha, grad_w, grad_b if ctx.has_bias else None


@torch.library.custom_op("tformer::dyt", mutates_args=(), device_types="cpu")
def _dyt_op(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return kernels.dyt_forward(x, alpha, weight, bias, True)


@_dyt_op.register_fake
def _(x, alpha, weight, bias):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("tformer::dyt_backward", mutates_args=(), device_types="cpu")
def _dyt_backward_op(grad_y: Tensor, x: Tensor, t: Tensor, alpha: Tensor, weight: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels.dyt_backward(grad_y.contiguous(), x, t, alpha, weight)


@_dyt_backward_op.register_fake
def _(grad_y, x, t, alpha, weight):
    return torch.empty_like(x), torch.empty_like(alpha), torch.empty_like(weight), torch.empty_like(weight)


def _dyt_setup(ctx, inputs, output) -> None:
    x, alpha, weight, bias = inputs
    ctx.save_for_backward(x, output[1], alpha, weight)
    ctx.has_bias = bias is not None


def _dyt_op_backward(ctx, grad_y, grad_t):
    x, t, alpha, weight = ctx.saved_tensors
    grad_x, grad_alpha, grad_w, grad_b = _dyt_backward_op(grad_y, x, t, alpha, weight)
    return grad_x, grad_alpha, grad_w, grad_b if ctx.has_bias else None


_dyt_op.register_autograd(_dyt_op_backward, setup_context=_dyt_setup)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """DyT by its C kernel; the caller checked ``takes_kernel(x, alpha, weight, bias)``."""
    if torch.compiler.is_compiling():
        return _dyt_op(x.contiguous(), alpha, weight, bias)[0]
    return _DyTFunction.apply(x.contiguous(), alpha, weight, bias)


# ---- ScaleNorm: scale * x / max(|x|, eps) -------------------------------------------------------

class _ScaleNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, eps: float) -> Tensor:
        y, norm = kernels.scale_norm_forward(x, scale, eps)
        ctx.save_for_backward(x, scale, norm)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, scale, norm = ctx.saved_tensors
        grad_x, grad_scale = kernels.scale_norm_backward(grad_y.contiguous(), x, scale, norm, ctx.eps)
        return grad_x, grad_scale, None


@torch.library.custom_op("tformer::scale_norm", mutates_args=(), device_types="cpu")
def _scale_norm_op(x: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return kernels.scale_norm_forward(x, scale, eps)


@_scale_norm_op.register_fake
def _(x, scale, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


@torch.library.custom_op("tformer::scale_norm_backward", mutates_args=(), device_types="cpu")
def _scale_norm_backward_op(grad_y: Tensor, x: Tensor, scale: Tensor, norm: Tensor, eps: float
                            ) -> tuple[Tensor, Tensor]:
    return kernels.scale_norm_backward(grad_y.contiguous(), x, scale, norm, eps)


@_scale_norm_backward_op.register_fake
def _(grad_y, x, scale, norm, eps):
    return torch.empty_like(x), torch.empty_like(scale)


def _scale_norm_setup(ctx, inputs, output) -> None:
    x, scale, eps = inputs
    ctx.save_for_backward(x, scale, output[1])
    ctx.eps = eps


def _scale_norm_op_backward(ctx, grad_y, grad_norm):
    x, scale, norm = ctx.saved_tensors
    grad_x, grad_scale = _scale_norm_backward_op(grad_y, x, scale, norm, ctx.eps)
    return grad_x, grad_scale, None


_scale_norm_op.register_autograd(_scale_norm_op_backward, setup_context=_scale_norm_setup)


def scale_norm(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    """ScaleNorm by its C kernel; the caller checked ``takes_kernel(x, scale)``."""
    if torch.compiler.is_compiling():
        return _scale_norm_op(x.contiguous(), scale, eps)[0]
    return _ScaleNormFunction.apply(x.contiguous(), scale, eps)


# ---- AdaNorm: scale * (1 - k * u) * u, u = LayerNorm(x) without affine, the factor detached -------

class _AdaNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float, k: float, scale: float) -> Tensor:
        y, mean, rstd = kernels.ada_norm_forward(x, eps, k, scale)
        ctx.save_for_backward(x, mean, rstd)
        ctx.k, ctx.scale = k, scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, mean, rstd = ctx.saved_tensors
        return kernels.ada_norm_backward(grad_y.contiguous(), x, mean, rstd, ctx.k, ctx.scale), None, None, None


@torch.library.custom_op("tformer::ada_norm", mutates_args=(), device_types="cpu")
def _ada_norm_op(x: Tensor, eps: float, k: float, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.ada_norm_forward(x, eps, k, scale)


@_ada_norm_op.register_fake
def _(x, eps, k, scale):
    return torch.empty_like(x), x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1])


@torch.library.custom_op("tformer::ada_norm_backward", mutates_args=(), device_types="cpu")
def _ada_norm_backward_op(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, k: float, scale: float) -> Tensor:
    return kernels.ada_norm_backward(grad_y.contiguous(), x, mean, rstd, k, scale)


@_ada_norm_backward_op.register_fake
def _(grad_y, x, mean, rstd, k, scale):
    return torch.empty_like(x)


def _ada_norm_setup(ctx, inputs, output) -> None:
    x, _, k, scale = inputs
    ctx.save_for_backward(x, output[1], output[2])
    ctx.k, ctx.scale = k, scale


def _ada_norm_op_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    return _ada_norm_backward_op(grad_y, x, mean, rstd, ctx.k, ctx.scale), None, None, None


_ada_norm_op.register_autograd(_ada_norm_op_backward, setup_context=_ada_norm_setup)


def ada_norm(x: Tensor, eps: float, k: float, scale: float) -> Tensor:
    """AdaNorm by its C kernel; the caller checked ``takes_kernel(x)``."""
    if torch.compiler.is_compiling():
        return _ada_norm_op(x.contiguous(), eps, k, scale)[0]
    return _AdaNormFunction.apply(x.contiguous(), eps, k, scale)


# ---- PowerNorm in training mode (eager only; see tformer.powernorm) -------------------------------

class PowerNormKernelFunction(torch.autograd.Function):
    """GroupScaling1D followed by ``PowerNormFunction``, fused: ``x`` is the input before group
    scaling and ``r`` its per-token, per-group ``1 / rms`` (``kernels.power_norm_stats``); the
    backward is PowerNormFunction's approximate one chained with group scaling's exact one, and
    updates ``nu`` in place the same way: by the mean of ``gt * xhat`` over the ``count`` tokens
    where ``keep`` (a bool per token, None: all) is True."""

    @staticmethod
    def forward(ctx, x, weight, bias, r, psi2, batch_psi2, nu, keep, count, alpha_bwd, eps, groups):
        y, scale = kernels.power_norm_forward(x, r, psi2, weight, bias, groups, eps)
        ctx.save_for_backward(x, weight, r, scale, batch_psi2, keep)
        ctx.nu, ctx.count, ctx.alpha_bwd, ctx.eps, ctx.groups = nu, count, alpha_bwd, eps, groups
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, r, scale, batch_psi2, keep = ctx.saved_tensors
        grad_x, grad_w, grad_b = kernels.power_norm_backward(
            grad_y.contiguous(), x, r, scale, batch_psi2, ctx.nu, weight, keep, ctx.count, ctx.groups, ctx.eps,
            ctx.alpha_bwd)
        grad_b = grad_b if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


# ---- BatchNorm over the non-padding tokens, training mode (eager only; see tformer.batchnorm) -----

def batch_norm_statistics(x: Tensor, keep: Tensor | None, count: int) -> tuple[Tensor, Tensor]:
    """Float64 ``(mean, biased variance)`` per channel of the ``count`` rows of the contiguous
    ``(rows, d)`` tensor ``x`` where ``keep`` is True (all when None)."""
    first = 0 if keep is None else int(keep.to(torch.uint8).argmax())  # a real row: the shift
    shift = x[first].contiguous()
    sums, squares = kernels.batch_norm_stats(x, keep, shift)
    offset = sums / count
    var = (squares / count - offset.square()).clamp_min_(0.0)
    return shift.double() + offset, var


class BatchNormKernelFunction(torch.autograd.Function):
    """``y = (x - mean) * rstd * weight + bias`` on ``(rows, d)`` rows with the exact gradient
    through ``mean`` and ``rstd`` (float64), the statistics of the ``count`` rows where ``keep`` is True."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep, mean, rstd, count):
        mean_x = mean.to(x.dtype)
        ctx.save_for_backward(x, weight, keep, mean_x, rstd)
        ctx.count, ctx.has_bias = count, bias is not None
        return kernels.batch_norm_forward(x, mean_x, (rstd * weight).to(x.dtype), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, keep, mean_x, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = kernels.batch_norm_backward(
            grad_y.contiguous(), x, keep, mean_x, rstd, weight, ctx.count)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None
