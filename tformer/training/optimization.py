"""The optimizer and learning-rate schedule of a recipe: AdamW with selective weight decay, a warmup schedule.

``replan_schedule`` lets a resumed run follow the current config's schedule (e.g. a longer
``train.steps`` re-plans the decay) rather than the one saved in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..schedulers import make_scheduler


def build_optimizer(model: nn.Module, train: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on norms, biases, scalars)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"])


def _total_steps(train: dict) -> int | None:
    """The schedule's length: ``train.steps``, or None when warmup alone fills the run."""
    return train["steps"] if train["steps"] > train["warmup_steps"] else None


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict):
    """``train.schedule`` with ``train.warmup_steps`` of warmup over ``train.steps``."""
    return make_scheduler(optimizer, train["schedule"], train["warmup_steps"], _total_steps(train),
                          min_lr_ratio=train["min_lr_ratio"])


def replan_schedule(scheduler, optimizer: torch.optim.Optimizer, train: dict) -> None:
    """After a resume, the current config's schedule wins (e.g. a longer ``train.steps`` re-plans the decay)."""
    wanted = {"warmup_steps": train["warmup_steps"], "total_steps": _total_steps(train),
              "min_lr_ratio": train["min_lr_ratio"], "base_lrs": [train["lr"]] * len(optimizer.param_groups)}
    if all(getattr(scheduler, k) == v for k, v in wanted.items()):
        return
    for key, value in wanted.items():
        setattr(scheduler, key, value)
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
