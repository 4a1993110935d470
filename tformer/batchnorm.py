"""BatchNorm for sequences (the baseline of Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization
in Transformers").

Per channel, over the non-padding tokens of the batch (every position of every sequence that is not
padding): ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` in training, with the biased batch
variance, and the running statistics in evaluation, updated in training as
``running <- (1 - momentum) * running + momentum * batch`` (the running variance from the unbiased
batch variance), as ``nn.BatchNorm1d`` does. Padding never enters a statistic. The gradient is the
exact one (through the batch statistics). Statistics are computed in float32 for half inputs.

Training on the CPU in float32/float64 outside ``torch.compile``, C kernels compute it
(``tformer.fused_norms.BatchNormKernelFunction``): the statistics of the real tokens in one pass
(sums shifted by a real token, totalled in float64), the output in a second, the backward's column sums and
then the gradient in two more; same results to rounding, same running-statistic updates. Evaluation,
other dtypes and devices, compiled graphs and batches without a real token take the composite below.

Importing this module registers the ``batchnorm`` norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fused_norms
from .norms import NORMS, NormTraits


@NORMS.register("batchnorm")
class SequenceBatchNorm(NormTraits, nn.Module):
    """Batch normalization over the non-padding tokens of a ``(batch, seq, d_model)`` input (see the module)."""

    uses_batch_statistics = True
    needs_padding_mask = True

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.register_buffer("running_var", torch.ones(d_model))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if (self.training and x.dim() >= 2 and x.numel() and not torch.compiler.is_compiling()
                and fused_norms.takes_kernel(x, self.weight, self.bias)
                and self.running_mean.dtype == self.running_var.dtype):
            y = self._kernel_forward(x, padding_mask)
            if y is not None:
                return y
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.training:
            # masked sums, not boolean indexing: no data-dependent shapes, so torch.compile keeps one graph
            values = x.to(stat_dtype)
            dims = tuple(range(x.dim() - 1))
            if padding_mask is None:
                keep = torch.ones(*x.shape[:-1], 1, dtype=stat_dtype, device=x.device)
            else:
                keep = (~padding_mask).unsqueeze(-1).to(stat_dtype)
            count = keep.sum()
            mean = (values * keep).sum(dims) / count.clamp_min(1.0)
            var = ((values - mean).square() * keep).sum(dims) / count.clamp_min(1.0)
            with torch.no_grad():  # a batch without real tokens leaves the running statistics alone
                rate = (count > 0).to(self.running_mean.dtype) * self.momentum
                unbiased = var * (count / (count - 1.0).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), rate)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), rate)
        else:
            mean, var = self.running_mean.to(stat_dtype), self.running_var.to(stat_dtype)
        y = ((x.to(stat_dtype) - mean) * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _kernel_forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """Training by the C kernels; None (the composite runs) for a batch without real tokens."""
        d = x.shape[-1]
        rows = x.reshape(-1, d).contiguous()
        keep = None if padding_mask is None else (~padding_mask).reshape(-1).contiguous()
        count = rows.shape[0] if keep is None else int(keep.sum())
        if keep is not None and count == rows.shape[0]:
            keep = None  # no padding in this batch
        if count == 0:
            return None
        with torch.no_grad():
            mean, var = fused_norms.batch_norm_statistics(rows, keep, count)
            unbiased = var * (count / max(count - 1.0, 1.0))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            rstd = (var + self.eps).rsqrt()
        y = fused_norms.BatchNormKernelFunction.apply(rows, self.weight, self.bias, keep, mean, rstd, count)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"
