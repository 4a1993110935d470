"""RMSNorm and the fastest exact route to it on each device (Zhang & Sennrich 2019).

PyTorch has no fused RMSNorm on the CPU (``F.rms_norm`` is a composite of five or more full-size
passes, ``nn.RMSNorm`` 5x ``nn.LayerNorm`` forward + backward). ``rms_norm`` picks, per call:

- CPU, float32/float64: the C kernel of ``tformer.kernels`` (one pass over memory each way), as an
  autograd Function in eager mode and a PyTorch custom op under ``torch.compile``;
- other CPU dtypes, or no C compiler: ``RMSNormFunction``, PyTorch's fused LayerNorm backward with
  the mean set to 0;
- CUDA and other devices: ``F.rms_norm``.

Importing this module registers the ``rmsnorm`` norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import kernels
from .errors import ConfigError
from .norms import NORMS, NormTraits


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm on any dtype without a compiler: PyTorch's fused LayerNorm backward, mean set to 0.

    LayerNorm's backward is ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with
    ``g = weight * dy`` and ``xhat = (x - mean) * rstd``; ``aten.native_layer_norm_backward`` takes
    ``mean`` and ``rstd`` as arguments. With ``mean = 0`` and RMSNorm's ``rstd`` it gives RMSNorm's
    ``dx`` minus the row constant ``rstd * mean(g)`` (one matrix-vector product, added back in place)
    and RMSNorm's ``dweight`` exactly. The forward is one fp32 reduction (``vector_norm``) and a
    scaled copy. Used where the C kernel is not (other dtypes, no compiler): 1.1-1.3x
    ``nn.LayerNorm`` at (8, 2048, 1024), where ``nn.RMSNorm`` is 5x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        d = x.shape[-1]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for half inputs
        rstd = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=stat_dtype)
        rstd = rstd.pow_(2).div_(d).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        # fp16: 1 / sqrt(eps) of a zero row can pass fp16's largest value (65504), so scale in fp32 first
        scale = rstd if x.dtype == torch.float16 else rstd.to(x.dtype)
        return torch.mul(x, scale).to(x.dtype).mul_(weight.to(x.dtype))

    @staticmethod
    @once_differentiable  # a second derivative would miss rstd's dependence on x: refuse it
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        rows_x, rows_grad = x.reshape(-1, d), grad_y.reshape(-1, d)
        rstd = rstd.reshape(-1)
        w = weight.to(rstd.dtype)  # the kernel's mixed-dtype path: half x, fp32 weight and stats
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            rows_grad, rows_x, [d], torch.zeros_like(rstd), rstd, w, None,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_x is not None:  # add back LayerNorm's mean(g) term: rstd * (dy @ w) / d per row
            mean_g = torch.mv(rows_grad.to(rstd.dtype), w).mul_(rstd).div_(d)
            grad_x = grad_x.add_(mean_g.unsqueeze(-1).to(grad_x.dtype)).view(x.shape)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


@torch.library.custom_op("tformer::rms_norm", mutates_args=(), device_types="cpu")
def _rms_norm_kernel(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return kernels.rms_norm_forward(x, weight, eps)


@_rms_norm_kernel.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


@torch.library.custom_op("tformer::rms_norm_backward", mutates_args=(), device_types="cpu")
def _rms_norm_kernel_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return kernels.rms_norm_backward(grad_y.contiguous(), x, weight, rstd)


@_rms_norm_kernel_backward.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _save_for_kernel_backward(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _kernel_backward(ctx, grad_y: Tensor, grad_rstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_kernel_backward(grad_y, x, weight, rstd)
    return grad_x, grad_w, None


_rms_norm_kernel.register_autograd(_kernel_backward, setup_context=_save_for_kernel_backward)


class _KernelFunction(torch.autograd.Function):
    """The C kernel in eager mode: the custom op's autograd wrapper costs ~100 us per call in Python,
    as much as the kernel itself on a (4, 128, 256) input; this path costs a third of that."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = kernels._forward(x, weight, eps)  # rms_norm checked device, dtype, contiguity
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = kernels._backward(grad_y.contiguous(), x, weight, rstd)
        return grad_x, grad_w, None


_kernels_available = kernels.available


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` by the fastest exact route for ``x``.

    - CPU, float32/float64 (``x`` and ``weight`` alike): the C kernel (``tformer.kernels``), one
      pass over memory forward and one backward, as fast as ``nn.LayerNorm``'s fused kernel;
      a PyTorch custom op, so ``torch.compile(fullgraph=True)`` keeps it in the graph.
    - other CPU dtypes (bf16, fp16; statistics in fp32), or no C compiler: ``RMSNormFunction``.
    - CUDA and other devices: ``F.rms_norm`` (fused there).

    The output has ``x``'s dtype. On the CPU it is differentiable once (a second derivative raises).
    """
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    if x.dtype == weight.dtype and x.dtype in kernels.KERNEL_DTYPES and _kernels_available():
        if torch.compiler.is_compiling():  # dynamo cannot trace ctypes; the custom op is opaque to it
            return _rms_norm_kernel(x.contiguous(), weight, eps)[0]
        return _KernelFunction.apply(x.contiguous(), weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


@NORMS.register("rmsnorm")
class RMSNorm(NormTraits, nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``g * x / sqrt(mean(x^2) + eps)``; no shift, no mean.

    Computed by ``rms_norm`` (same values as ``torch.nn.RMSNorm`` to float rounding; on the CPU
    a C kernel as fast as ``nn.LayerNorm`` where ``nn.RMSNorm`` is 5x slower, see
    ``tformer.kernels``). ``bias`` is accepted for a uniform factory signature and ignored:
    RMSNorm has no bias.

    ``unit_offset=True`` stores the gain as an offset from one, ``(1 + weight) * x / rms(x)`` with
    ``weight`` starting at zero: Gemma's convention (``norm_options={"unit_offset": True}``), kept so
    that Gemma weights load and export bit for bit.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, unit_offset: bool = False):
        super().__init__()
        if not isinstance(unit_offset, bool):
            raise ConfigError(f"unit_offset={unit_offset!r} must be True or False")
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(d_model) if unit_offset else torch.ones(d_model))

    @property
    def gain(self) -> Tensor:
        """The multiplier of the normalized input (``1 + weight`` with ``unit_offset``)."""
        return self.weight + 1.0 if self.unit_offset else self.weight

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return rms_norm(x, self.gain, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")
