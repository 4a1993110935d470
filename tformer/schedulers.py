"""Learning-rate schedules with linear warmup, as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

Time ``t`` counts ``scheduler.step()`` calls (0 at construction). With ``W = warmup_steps`` and
``T = total_steps``:

* warmup (all but ``none``): ``lr = lr_max * t / W`` for ``t <= W``; ``W = 0`` means no warmup;
* ``constant``: ``lr_max`` after warmup;
* ``inverse_sqrt``: ``lr_max * sqrt(W / t)`` after warmup (Vaswani et al. 2017; fairseq; Xiong et
  al. 2020's schedule); without warmup ``lr_max / sqrt(max(t, 1))``;
* ``linear``: ``lr_max * (1 - p)`` with ``p = (t - W) / (T - W)`` clamped to [0, 1];
* ``cosine``: ``lr_max * 0.5 * (1 + cos(pi * p))``;
* ``wsd`` (warmup-stable-decay): ``lr_max`` until the last ``decay_fraction`` of ``T`` (default
  20%), then linearly to 0;
* ``none``: ``lr_max`` throughout, no warmup.

``linear``, ``cosine`` and ``wsd`` reach 0 at ``T`` unless ``min_lr_ratio`` asks for a floor:
the decay then ends at ``min_lr_ratio * lr_max``. They need ``total_steps``.
"""

from __future__ import annotations

import math
import numbers

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .errors import ConfigError
from .registry import Registry

SCHEDULERS: Registry[type[LRScheduler]] = Registry("scheduler")


class WarmupScheduler(LRScheduler):
    """Linear warmup from 0 over ``warmup_steps``, then ``decay(t)`` times each group's initial lr."""

    needs_total_steps = False
    has_warmup = True

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        *,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        name = type(self).__name__
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps <= warmup_steps
        ):
            raise ConfigError(f"total_steps={total_steps!r} must be an integer > warmup_steps={warmup_steps}")
        if self.needs_total_steps and total_steps is None:
            raise ConfigError(f"the {name} schedule decays to its end and needs total_steps, got None")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        """The multiplier of the initial learning rate after ``t`` steps."""
        if self.has_warmup and t < self.warmup_steps:
            return t / self.warmup_steps
        return self.decay(t)

    def decay(self, t: int) -> float:
        raise NotImplementedError

    def progress(self, t: int) -> float:
        """``p = (t - W) / (T - W)`` clamped to [0, 1]."""
        return min(max((t - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)

    def with_floor(self, fraction: float) -> float:
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * fraction

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


@SCHEDULERS.register("none")
class NoSchedule(WarmupScheduler):
    has_warmup = False

    def decay(self, t: int) -> float:
        return 1.0


@SCHEDULERS.register("constant")
class ConstantSchedule(WarmupScheduler):
    def decay(self, t: int) -> float:
        return 1.0


@SCHEDULERS.register("inverse_sqrt")
class InverseSqrtSchedule(WarmupScheduler):
    def decay(self, t: int) -> float:
        if self.warmup_steps == 0:
            return 1.0 / math.sqrt(max(t, 1))
        return math.sqrt(self.warmup_steps / t)


@SCHEDULERS.register("linear")
class LinearSchedule(WarmupScheduler):
    needs_total_steps = True

    def decay(self, t: int) -> float:
        return self.with_floor(1.0 - self.progress(t))


@SCHEDULERS.register("cosine")
class CosineSchedule(WarmupScheduler):
    needs_total_steps = True

    def decay(self, t: int) -> float:
        return self.with_floor(0.5 * (1.0 + math.cos(math.pi * self.progress(t))))


@SCHEDULERS.register("wsd")
class WarmupStableDecaySchedule(WarmupScheduler):
    needs_total_steps = True

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None, *,
                 decay_fraction: float = 0.2, min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if not 0.0 < decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction={decay_fraction!r} must be in (0, 1]")
        self.decay_fraction = decay_fraction
        super().__init__(optimizer, warmup_steps, total_steps, min_lr_ratio=min_lr_ratio, last_epoch=last_epoch)

    def decay(self, t: int) -> float:
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
        if t <= decay_start:
            return 1.0
        return self.with_floor(1.0 - min((t - decay_start) / (self.total_steps - decay_start), 1.0))


def make_scheduler(
    optimizer: Optimizer, name: str, warmup_steps: int = 0, total_steps: int | None = None, **options
) -> LRScheduler:
    """Build the registered schedule ``name`` (see the module docstring for each formula).

    ``options``: ``min_lr_ratio`` (linear, cosine, wsd), ``decay_fraction`` (wsd).
    """
    cls = SCHEDULERS.get_or_raise(name)
    try:
        return cls(optimizer, warmup_steps, total_steps, **options)
    except TypeError as error:
        raise ConfigError(f"scheduler {name!r} does not take {sorted(options)}: {error}") from None
