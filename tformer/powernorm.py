"""PowerNorm (Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers").

Per channel, with statistics over the non-padding tokens of the batch:

* optional GroupScaling1D pre-step: each token divided by its RMS within each of ``group_num``
  channel groups (eps 1e-5);
* batch quadratic mean ``psi2_B = mean(x^2)`` over the non-padding tokens;
* training, iteration ``t <= warmup_iters``: ``xhat = x / sqrt(psi2_B + eps)``; afterwards
  ``xhat = x / sqrt(psi2 + eps)`` with the running ``psi2``;
* running update: the cumulative mean of ``psi2_B`` during warmup, then
  ``psi2 <- alpha_fwd * psi2 + (1 - alpha_fwd) * psi2_B``;
* approximate backward (custom autograd Function): ``g = gamma * dL/dy``,
  ``gt = g - (1 - alpha_bwd) * nu * xhat``, ``dL/dx = gt / sqrt(psi2_B + eps)``, then
  ``nu <- nu + mean(gt * xhat)`` over the non-padding tokens;
* eval: ``x / sqrt(psi2 + eps)`` with the running statistics; output ``gamma * xhat + beta``.

Where this follows the paper and where the authors' code (fairseq ``mask_powernorm.py``) differs:

* The official code updates the running statistic with the cumulative mean during warmup *and*
  then also applies the EMA step in the same iteration; it uses ``t <= warmup`` for the forward
  but ``t < warmup`` for the cumulative mean. We apply exactly one rule per iteration, switching
  at the same ``t`` for both, as the paper's Algorithm 1 describes.
* The official backward averages ``gt * xhat`` for ``nu`` over all positions, padding included;
  we use the non-padding positions only, so padding never moves any running statistic.
* Like the official code (and unlike a literal reading of the paper) the backward divides by the
  *batch* ``psi2_B`` also after warmup, while the forward uses the running ``psi2``.
* GroupScaling1D is not in the paper; the official ``MaskPowerNorm`` applies it with one group by
  default, and so does a standalone ``PowerNorm``; the authors' models build it with one group per
  attention head, and so do tformer's blocks (``group_num=0`` turns it off).
* The official default ``warmup_iters`` is 10000; short experiments want a smaller value,
  e.g. ``BlockConfig(..., norm_options={"warmup_iters": 100})``.

Training on the CPU in float32/float64 outside ``torch.compile``, C kernels
(``tformer.fused_norms.PowerNormKernelFunction``) do the group scaling, the masked batch statistic,
the output and the backward with the ``nu`` update in three passes over memory (the composite takes
over a dozen), with the same running-statistic rules. Evaluation, other dtypes and devices, compiled
graphs and batches without a real token take the composite route.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from . import fused_norms
from .errors import ConfigError
from .norms import NORMS, NormTraits


def group_scale(x: Tensor, group_num: int, eps: float = 1e-5) -> Tensor:
    """Divide each token by its root mean square within each of ``group_num`` channel groups."""
    groups = rearrange(x, "... (g c) -> ... g c", g=group_num)
    rms = groups.square().mean(-1, keepdim=True).add(eps).sqrt()
    return rearrange(groups / rms, "... g c -> ... (g c)")


def masked_channel_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean over every dim but the last, of the tokens where ``keep`` (shape ``values.shape[:-1] + (1,)``) is 1."""
    dims = tuple(range(values.dim() - 1))
    if keep is None:  # an empty batch gives 0 (its count clamped to 1), not a NaN mean
        return values.sum(dims) / max(values.numel() // max(values.shape[-1], 1), 1)
    return (values * keep).sum(dims) / keep.sum().clamp_min(1.0)


class PowerNormFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(psi2 + eps) + bias`` with PowerNorm's approximate backward.

    ``psi2`` normalizes the forward (batch or running statistic); ``batch_psi2`` scales the
    backward; ``nu`` (the running gradient statistic) is read and updated in place by backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, psi2, batch_psi2, nu, keep, alpha_bwd, eps):
        xhat = x * torch.rsqrt(psi2 + eps).to(x.dtype)
        ctx.save_for_backward(xhat, weight, batch_psi2, keep)
        # nu is a running statistic that backward updates in place: kept by reference, not saved,
        # so autograd's version check does not reject the update.
        ctx.nu, ctx.alpha_bwd, ctx.eps = nu, alpha_bwd, eps
        ctx.has_bias = bias is not None
        y = xhat * weight if weight is not None else xhat
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y):
        xhat, weight, batch_psi2, keep = ctx.saved_tensors
        nu = ctx.nu
        g = grad_y * weight if weight is not None else grad_y
        g_tilde = g - ((1.0 - ctx.alpha_bwd) * nu).to(g.dtype) * xhat
        grad_x = g_tilde * torch.rsqrt(batch_psi2 + ctx.eps).to(g.dtype)
        nu.add_(masked_channel_mean((g_tilde * xhat).to(nu.dtype), keep))
        dims = tuple(range(grad_y.dim() - 1))
        grad_w = (grad_y * xhat).sum(dims) if weight is not None else None
        grad_b = grad_y.sum(dims) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


@NORMS.register("powernorm")
class PowerNorm(NormTraits, nn.Module):
    """PowerNorm (Shen et al. 2020) with masked batch statistics; see the module docstring.

    Buffers ``running_psi2`` (init 1), ``nu`` (init 0) and ``iters`` are part of the state dict,
    so a checkpoint resumes the statistics exactly.

    ``group_num``: standalone (``make_norm("powernorm", d)``) the official ``MaskPowerNorm``
    default of one group; inside a block the authors' models (their ``NormSelect``) use one group
    per attention head, and so does tformer (``block_defaults``); ``norm_options`` overrides it.
    """

    uses_batch_statistics = True
    needs_padding_mask = True
    exact_gradient = False

    @classmethod
    def block_defaults(cls, d_model: int, n_heads: int) -> dict:
        # one group per head where the heads split d_model evenly; with a head_dim that does not (e.g.
        # d_model=6, n_heads=4, head_dim=2) the groups cannot follow the heads: one group, the standalone default
        return {"group_num": n_heads if d_model % n_heads == 0 else 1}

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        bias: bool = True,
        alpha_fwd: float = 0.9,
        alpha_bwd: float = 0.9,
        warmup_iters: int = 10000,
        group_num: int = 1,
        group_eps: float = 1e-5,
    ):
        super().__init__()
        if isinstance(group_num, bool) or not isinstance(group_num, int) or group_num < 0 or (
                group_num and d_model % group_num):
            raise ConfigError(f"group_num={group_num!r} (a PowerNorm option, norm_options) must be 0 (off) or an int "
                              f"that divides d_model={d_model}")
        self.eps, self.alpha_fwd, self.alpha_bwd = eps, alpha_fwd, alpha_bwd
        self.warmup_iters, self.group_num, self.group_eps = warmup_iters, group_num, group_eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.register_buffer("running_psi2", torch.ones(d_model))
        self.register_buffer("nu", torch.zeros(d_model))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if (self.training and x.numel() and not torch.compiler.is_compiling()
                and fused_norms.takes_kernel(x, self.weight, self.bias, self.running_psi2, self.nu)):
            y = self._kernel_forward(x, padding_mask)  # group scaling included
            if y is not None:
                return y
        if self.group_num:
            x = group_scale(x, self.group_num, self.group_eps)
        if not self.training:
            y = x * torch.rsqrt(self.running_psi2 + self.eps).to(x.dtype)
            y = y * self.weight
            return y + self.bias if self.bias is not None else y

        stat_dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision inputs: fp32 statistics
        keep = None if padding_mask is None else (~padding_mask).unsqueeze(-1).to(stat_dtype)
        with torch.no_grad():
            batch_psi2 = masked_channel_mean(x.detach().to(stat_dtype).square(), keep).to(self.running_psi2.dtype)
            # a batch without a real token (empty, or all padding) leaves the statistics and the count alone
            real = x.numel() > 0 if keep is None else keep.sum() > 0
            psi2, new_running = self._running_update(batch_psi2, real)
        y = PowerNormFunction.apply(
            x, self.weight, self.bias, psi2, batch_psi2, self.nu, keep, self.alpha_bwd, self.eps
        )
        with torch.no_grad():
            self.running_psi2.copy_(new_running)
        return y

    def _running_update(self, batch_psi2: Tensor, real: bool | Tensor = True) -> tuple[Tensor, Tensor]:
        """``(psi2 for the forward, the new running_psi2)``; counts the iteration. ``real``: whether the batch
        has a real token (a bool, or a bool tensor under ``torch.compile``); without one nothing changes and
        the forward normalizes by the running statistic."""
        if real is False:
            return self.running_psi2, self.running_psi2
        if real is not True:
            self.iters += real.to(self.iters.dtype)
        else:
            self.iters += 1
        in_warmup = self.iters <= self.warmup_iters
        psi2 = torch.where(in_warmup, batch_psi2, self.running_psi2)
        cumulative = self.running_psi2 + (batch_psi2 - self.running_psi2) / self.iters.clamp_min(1)
        ema = self.alpha_fwd * self.running_psi2 + (1.0 - self.alpha_fwd) * batch_psi2
        new_running = torch.where(in_warmup, cumulative, ema)
        if real is not True:
            psi2, new_running = torch.where(real, psi2, self.running_psi2), torch.where(real, new_running, self.running_psi2)
        return psi2, new_running

    def _kernel_forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """Training by the C kernels: the statistics and buffers of the composite route, the running
        update written with Python scalars (eager only; fewer small ops, the same values). None (the
        composite runs) for a batch without a real token."""
        x = x.contiguous()
        tokens = x.numel() // x.shape[-1]
        keep = None if padding_mask is None else (~padding_mask).reshape(-1).contiguous()
        count = tokens if keep is None else int(keep.sum())
        if keep is not None and count == tokens:
            keep = None  # no padding in this batch
        if count == 0:
            return None
        with torch.no_grad():
            r, sums = fused_norms.kernels.power_norm_stats(x, self.group_num, self.group_eps, keep)
            batch_psi2 = sums.div_(count)
            self.iters += 1
            step = int(self.iters)
            if step <= self.warmup_iters:  # the cumulative mean: running + (batch - running) / step
                psi2 = batch_psi2
                self.running_psi2.lerp_(batch_psi2, 1.0 / step)
            else:  # alpha * running + (1 - alpha) * batch, normalizing by the running value before it
                psi2 = self.running_psi2.clone()
                self.running_psi2.lerp_(batch_psi2, 1.0 - self.alpha_fwd)
        return fused_norms.PowerNormKernelFunction.apply(
            x, self.weight, self.bias, r, psi2, batch_psi2, self.nu, keep, count, self.alpha_bwd, self.eps,
            self.group_num,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bwd={self.alpha_bwd}, warmup_iters={self.warmup_iters}, group_num={self.group_num}"
        )
