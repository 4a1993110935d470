"""BatchNorm for sequences (the baseline of Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization
in Transformers").

Per channel, over the non-padding tokens of the batch (every position of every sequence that is not
padding): ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` in training, with the biased batch
variance, and the running statistics in evaluation, updated in training as
``running <- (1 - momentum) * running + momentum * batch`` (the running variance from the unbiased
batch variance), as ``nn.BatchNorm1d`` does. Padding never enters a statistic. The gradient is the
exact one (through the batch statistics). Statistics are computed in float32 for half inputs.

Importing this module registers the ``batchnorm`` norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.training:
            values = x.to(stat_dtype).reshape(-1, x.shape[-1])
            if padding_mask is not None:
                values = values[~padding_mask.reshape(-1)]
            count = values.shape[0]
            mean = values.mean(0) if count else values.new_zeros(x.shape[-1])
            var = (values - mean).square().mean(0) if count else values.new_ones(x.shape[-1])
            if count:
                with torch.no_grad():
                    unbiased = var * (count / max(count - 1, 1))
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(stat_dtype), self.running_var.to(stat_dtype)
        y = ((x.to(stat_dtype) - mean) * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"
