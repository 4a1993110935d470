"""Normalization layers and their registry.

Every norm is an ``nn.Module`` called as ``norm(x, padding_mask=None)`` with ``x`` of shape
``(batch, seq, d_model)`` and ``padding_mask`` a ``(batch, seq)`` bool tensor, True at padding.
Per-token norms ignore the mask; norms with batch statistics (PowerNorm) use it to leave the
padding positions out of their statistics.

Adding a norm is one class plus one ``@NORMS.register(name)`` line; the test suite parametrizes
over the registry and picks it up.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")

#: ``norm="deepnorm"`` is shorthand for LayerNorm in the DeepNorm placement (see BlockConfig).
DEEPNORM_ALIAS = "deepnorm"


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016): ``g * (x - mean) / sqrt(var + eps) + b`` over the last dim.

    PyTorch's fused kernel; the parameters are named as in ``nn.LayerNorm`` so weights copy
    across unchanged.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(d_model, eps=eps, bias=bias)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: fewer passes and temporaries than autograd's composite.

    On CPU ``F.rms_norm`` is not a fused kernel; its autograd graph allocates a full-size tensor
    per elementwise op. Here the statistic is one fp32 reduction (``vector_norm``), the forward two
    passes, and the backward reuses its buffers in place:
    ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = weight * dy``, ``xhat = x * rstd``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        d = x.shape[-1]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for half inputs
        rstd = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=stat_dtype)
        rstd = rstd.pow_(2).div_(d).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd.to(x.dtype)).mul_(weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        r = rstd.to(x.dtype)
        xhat = torch.mul(x, r)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mul(grad_y, xhat).flatten(0, -2).sum(0, dtype=rstd.dtype).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = torch.mul(grad_y, weight.to(grad_y.dtype))
            mean_gx = torch.linalg.vecdot(g.to(rstd.dtype), xhat.to(rstd.dtype), dim=-1).unsqueeze(-1).div_(d)
            grad_x = g.sub_(xhat.mul_(mean_gx.to(x.dtype))).mul_(r)
        return grad_x, grad_w, None


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``g * x / sqrt(mean(x^2) + eps)``; no shift, no mean.

    Computed by ``RMSNormFunction`` (same values as ``torch.nn.RMSNorm`` to float rounding, about
    twice as fast on CPU for forward + backward). ``bias`` is accepted for a uniform factory
    signature and ignored: RMSNorm has no bias.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@NORMS.register("dyt")
class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025), a norm-free stand-in: ``g * tanh(a * x) + b``.

    ``a`` is one learnable scalar, initialised to ``alpha_init`` (0.5 in the paper).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        y = torch.tanh(self.alpha * x) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}"


@NORMS.register("none")
class NoNorm(nn.Module):
    """The identity: for placements studied without any normalization."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return x


def _option_names(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n in params if n not in ("self", "d_model", "eps", "bias")}


def check_norm_options(name: str, options: dict) -> None:
    """Raise ``ConfigError`` if ``options`` holds a keyword the norm ``name`` does not take."""
    cls = NORMS.get_or_raise(name)
    unknown = set(options) - _option_names(cls)
    if unknown:
        valid = sorted(_option_names(cls))
        raise ConfigError(
            f"norm_options={options!r}: {', '.join(sorted(unknown))} not accepted by norm {name!r}; "
            f"valid options: {', '.join(valid) if valid else 'none'}"
        )


def make_norm(name: str, d_model: int, *, eps: float = 1e-5, bias: bool = True, **options) -> nn.Module:
    """Build the registered norm ``name`` for feature size ``d_model``.

    ``options`` go to the norm's constructor (e.g. ``warmup_iters`` for PowerNorm, ``alpha_init``
    for DyT). ``"deepnorm"`` is accepted here as an alias of ``"layernorm"``.
    """
    if name == DEEPNORM_ALIAS:
        name = "layernorm"
    check_norm_options(name, options)
    return NORMS[name](d_model, eps=eps, bias=bias, **options)


# PowerNorm lives in its own module; importing it registers it.
from . import powernorm as _powernorm  # noqa: E402,F401
