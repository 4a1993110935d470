"""How one optimizer step's gradients are computed: precision, accumulation, compile, activation checkpointing.

``StepEngine.gradients(batch)`` runs ``train.grad_accum`` micro-batches of the step's batch through
forward and backward and returns the step's loss and gradient norm (``skips`` says whether the fp16
scaler will skip the update); ``StepEngine.update()`` then steps the optimizer (through the scaler).

* ``train.precision``: ``fp32``; ``bf16`` (``torch.autocast`` on CPU and CUDA; parameters, optimizer
  state and the loss stay float32, and tformer's norms compute their statistics in float32);
  ``fp16`` (CUDA only: autocast plus a ``torch.amp.GradScaler``, whose skipped steps, where the
  scaled gradients overflowed, are counted and logged rather than taken for a divergence).
* ``train.grad_accum = k``: the step's batch (``batch_size * k`` sequences over all processes) is cut
  into ``k`` micro-batches of ``batch_size``; each micro-batch's loss is weighted by its share of the
  step's loss tokens, so the summed gradient is the full batch's (to float rounding). Under DDP the
  inner micro-batches skip the gradient all-reduce (``no_sync``); only the last one synchronizes.
* ``train.compile``: the model runs under ``torch.compile(fullgraph=True)``. The first step (which
  compiles) is timed and reported as ``compile_s``; if compiling fails or the graph breaks, a warning
  names the error and training continues eagerly from the same state (RNG included).
* ``train.activation_checkpointing``: every block's activations are recomputed in backward instead
  of stored (``torch.utils.checkpoint``, non-reentrant, RNG preserved: same values and gradients).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .distributed import full_value, is_sharded

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: consecutive steps the fp16 gradient scaler may skip before the run counts as diverged
MAX_CONSECUTIVE_SKIPS = 25


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, naming the valid choices."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r}; valid choices: {', '.join(map(repr, PRECISIONS))}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision='fp16' needs a CUDA device (this run is on {device.type}: float16 arithmetic there "
            f"is emulated, slow and has no loss scaling support worth using); use train.precision=bf16, which "
            f"autocasts on CPU with bfloat16 (same exponent range as float32, no scaler needed)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision='bf16' is not supported by this GPU; use fp16 (with a gradient scaler)")


def check_grad_accum(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.grad_accum={value!r} must be an integer >= 1 (1: no accumulation)")


class StepEngine:
    """Forward, backward and update of one training step (see the module docstring)."""

    def __init__(self, model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, task, train: dict,
                 device: torch.device):
        check_precision(train["precision"], device)
        check_grad_accum(train["grad_accum"])
        self.model, self.optimizer, self.task, self.device = model, optimizer, task, device
        self.sharded = is_sharded(model)
        # FSDP applies the precision through its own policy (parameters gathered in bf16/fp16): no autocast then
        self.dtype = None if self.sharded else PRECISIONS[train["precision"]]
        self.accum = train["grad_accum"]
        self.clip = train["grad_clip"]
        self.scaler = torch.amp.GradScaler(device.type) if train["precision"] == "fp16" else None
        self.trained = trained
        self.forward_model = trained
        self.compiling = bool(train["compile"])
        if self.compiling:
            self.forward_model = torch.compile(trained, fullgraph=True)
        self.compile_seconds: float | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        set_activation_checkpointing(model, bool(train["activation_checkpointing"]))

    # ------------------------------------------------------------------------------------------ forward

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss(self, model: nn.Module, batch) -> Tensor:
        """The task's loss of ``model`` on ``batch`` in the run's precision (the loss itself in float32)."""
        with self.autocast():
            return self.task.loss(model, batch).float()

    # ------------------------------------------------------------------------------------------ step

    def gradients(self, batch) -> tuple[Tensor, Tensor]:
        """Forward and backward over the step's micro-batches; returns ``(loss, grad_norm)`` (unscaled)."""
        if self.compiling and self.compile_seconds is None:
            return self._first_compiled_step(batch)
        return self._gradients(batch)

    def _first_compiled_step(self, batch) -> tuple[Tensor, Tensor]:
        rng = torch.get_rng_state()
        start = time.perf_counter()
        try:
            result = self._gradients(batch)
        except Exception as error:  # a graph break (fullgraph=True) or any failure to compile
            warnings.warn(f"train.compile: torch.compile failed ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); training eagerly",
                          RuntimeWarning, stacklevel=3)
            torch.set_rng_state(rng)
            self.forward_model, self.compiling = self.trained, False
            self.compile_seconds = 0.0
            return self._gradients(batch)
        self.compile_seconds = time.perf_counter() - start
        return result

    def _gradients(self, batch) -> tuple[Tensor, Tensor]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = split_batch(batch, self.accum)
        weights = [float(self.task.loss_tokens(m)) for m in micro]
        total_weight = sum(weights) or 1.0
        total = torch.zeros((), device=self.device)
        for i, (part, weight) in enumerate(zip(micro, weights)):
            last = i == len(micro) - 1
            with self._gradient_sync(last):  # the inner micro-batches only accumulate locally
                loss = self.loss(self.forward_model, part) * (weight / total_weight)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip > 0 else math.inf)
        return total, full_value(grad_norm)

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        if self.sharded:  # FSDP2: reduce-scatter the gradients only on the last micro-batch
            self.trained.set_requires_gradient_sync(sync)
            yield
        elif not sync and hasattr(self.trained, "no_sync"):  # DDP
            with self.trained.no_sync():
                yield
        else:
            yield

    def skips(self, loss: Tensor, grad_norm: Tensor) -> bool:
        """Whether the gradient scaler will skip this step (finite loss, overflowed fp16 gradients)."""
        return self.scaler is not None and bool(torch.isfinite(loss)) and not bool(torch.isfinite(grad_norm))

    def update(self) -> bool:
        """Step the optimizer (via the scaler under fp16); returns whether the step was skipped."""
        if self.scaler is None:
            self.optimizer.step()
            return False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        return skipped

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def split_batch(batch: tuple, parts: int) -> list[tuple]:
    """``batch`` (a tuple of tensors sharing their first dimension) cut into ``parts`` equal micro-batches."""
    if parts == 1:
        return [batch]
    size = batch[0].shape[0]
    if size % parts:
        raise ConfigError(f"this process's batch of {size} sequences does not split into train.grad_accum={parts} "
                          f"equal micro-batches")
    pieces = [t.chunk(parts) for t in batch]
    return [tuple(p[i] for p in pieces) for i in range(parts)]


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off in every stack of ``model`` (see ``tformer.stacks``)."""
    from ..stacks import _Stack

    for module in model.modules():
        if isinstance(module, _Stack):
            module.activation_checkpointing = enabled
