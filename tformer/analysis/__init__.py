"""Analysis: why a placement trains or diverges.

* ``gradient_scales(model, batch, loss_fn)``: per block, sublayer and weight, the gradient norm.
* ``expected_gradient_scales(model, batches, loss_fn)``: Xiong et al.'s scale of the expected gradient.
* ``TrainingMonitor``: per-step gradient norms, update ratios, residual norms, attention entropy and
  gradient noise scale during training; ``attach()`` / ``detach()``.
* ``tformer.analysis.reproductions``: the papers' figures, one command each (``tformer analyze``).
"""

from .monitor import TrainingMonitor, attention_entropy
from .scales import expected_gradient_scales, find_blocks, gradient_scales, parameter_groups

__all__ = [
    "TrainingMonitor",
    "attention_entropy",
    "expected_gradient_scales",
    "find_blocks",
    "gradient_scales",
    "parameter_groups",
]
