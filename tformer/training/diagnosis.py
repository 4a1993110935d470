"""Divergence diagnosis: when the loss or a gradient goes non-finite, say where it started.

``divergence_message`` names the step, the first module (embedding, block, head, final norm)
whose forward output went non-finite, the blocks whose gradients did in back-propagation order,
and whether a good checkpoint is kept; the training loop raises it as ``TrainingDiverged``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message says where."""


def _block_name(param_name: str) -> str:
    parts = param_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) or parts[0]


def nonfinite_gradient_blocks(model: nn.Module) -> list[str]:
    """Blocks (and embedding, head, final norm) holding inf/NaN gradients, in backward order from the loss.

    The first entry is where back-propagation first produced a non-finite gradient.
    """
    names = [_block_name(n) for n, p in reversed(list(model.named_parameters()))
             if p.grad is not None and not torch.isfinite(p.grad).all()]
    return list(dict.fromkeys(names))


@torch.no_grad()
def first_nonfinite_output(model: nn.Module, run) -> str | None:
    """Rerun ``run()`` with hooks; the first module (embedding, block, head) whose output is non-finite."""
    found: list[str] = []
    watched = [(n, m) for n, m in model.named_modules()
               if n.endswith(("embedding", "head", "final_norm")) or (n.split(".")[-2:-1] == ["layers"])]

    def hook(name):
        def check(module, inputs, output):
            if not found and isinstance(output, Tensor) and not torch.isfinite(output).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in watched]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def divergence_message(step: int, loss: Tensor, model: nn.Module, rerun, run_dir: Path) -> str:
    """Why step ``step`` failed; ``rerun()`` recomputes its loss (for the forward hooks)."""
    bad_output = first_nonfinite_output(model, rerun)
    bad_grads = nonfinite_gradient_blocks(model)
    what = f"loss is {loss.item()}" if not torch.isfinite(loss) else "the gradient norm is not finite"
    parts = [f"training diverged at step {step}: {what}"]
    if bad_output:
        parts.append(f"the first non-finite output comes from {bad_output}")
    if bad_grads:
        shown = ", ".join(bad_grads[:6]) + (f" and {len(bad_grads) - 6} more" if len(bad_grads) > 6 else "")
        parts.append(f"gradients first go non-finite at {bad_grads[0]} (back-propagating from the loss: {shown})")
    latest = run_dir / "latest.json"
    kept = f"the last good checkpoint is kept in {run_dir}" if latest.exists() else "no checkpoint had been written yet"
    return "; ".join(parts) + f"; {kept}"


def scaler_stuck_message(step: int, skips: int, scale: float, model: nn.Module, run_dir: Path) -> str:
    """The fp16 gradient scaler skipped ``skips`` steps in a row: the gradients overflow at every scale."""
    bad_grads = nonfinite_gradient_blocks(model)
    where = f"; gradients first go non-finite at {bad_grads[0]}" if bad_grads else ""
    latest = run_dir / "latest.json"
    kept = f"the last good checkpoint is kept in {run_dir}" if latest.exists() else "no checkpoint had been written yet"
    return (f"training diverged at step {step}: the fp16 gradient scaler skipped the last {skips} steps (loss scale "
            f"now {scale:g}), so the gradients are non-finite however small the scale{where}; {kept}")
