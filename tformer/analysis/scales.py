"""Per-layer gradient scales: which parameters of which block get how much gradient.

Rows name each parameter group by ``stack`` (encoder/decoder), ``layer`` (0-based index within
its stack), ``sublayer`` (attn, cross_attn, ffn) and ``param``: the sublayer's weight matrices
(``attn.q``, ``attn.k``, ``attn.v`` as slices of the fused projection, ``attn.out``,
``ffn.w1``, ``ffn.w2``, ``ffn.w3`` for gated activations) and its placement's norm gains
(``attn_residual.norm``, ``ffn_residual.norm_in``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attention import MultiHeadAttention
from ..blocks import TransformerBlock


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group of interest: a weight, or a row slice of a fused weight."""

    stack: str
    layer: int
    sublayer: str
    param: str
    weight: nn.Parameter
    rows: slice | None = None

    def view(self, tensor: Tensor) -> Tensor:
        return tensor if self.rows is None else tensor[self.rows]

    def key(self) -> tuple:
        return (self.stack, self.layer, self.sublayer, self.param)


def find_blocks(model: nn.Module) -> list[tuple[str, int, str, TransformerBlock]]:
    """``(stack, layer, module_name, block)`` for every tformer block inside ``model``, in forward order.

    The layer index counts the blocks of each stack kind in the order they appear, so it works for
    tformer's stacks and for any container a user puts blocks in.
    """
    found, counts = [], {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerBlock):
            stack = module.layer.stack
            found.append((stack, counts.get(stack, 0), name, module))
            counts[stack] = counts.get(stack, 0) + 1
    return found


def _attention_groups(stack, layer, sublayer, attn: MultiHeadAttention) -> list[ParamGroup]:
    d, kv = attn.d_model, attn.kv_size  # kv < d with grouped-query attention
    if attn.cross:
        parts = [("q", attn.q.weight, None), ("k", attn.kv.weight, slice(0, kv)), ("v", attn.kv.weight, slice(kv, 2 * kv))]
    else:
        parts = [("q", attn.qkv.weight, slice(0, d)), ("k", attn.qkv.weight, slice(d, d + kv)),
                 ("v", attn.qkv.weight, slice(d + kv, d + 2 * kv))]
    parts.append(("out", attn.out.weight, None))
    return [ParamGroup(stack, layer, sublayer, f"{sublayer}.{n}", w, rows) for n, w, rows in parts]


def parameter_groups(model: nn.Module) -> list[ParamGroup]:
    """Every parameter group of interest of every tformer block in ``model``, in forward order."""
    groups = []
    for stack, layer, _, block in find_blocks(model):
        for sublayer, (module, placement) in block.residual_sublayers().items():
            if isinstance(module, MultiHeadAttention):
                groups += _attention_groups(stack, layer, sublayer, module)
            else:
                for name in ("w1", "w3", "w2"):  # tformer's FeedForward; a custom sublayer has other names
                    linear = getattr(module, name, None)
                    if isinstance(linear, nn.Linear):
                        groups.append(ParamGroup(stack, layer, sublayer, f"{sublayer}.{name}", linear.weight))
            for norm_name, norm in placement.named_children():
                weight = getattr(norm, "weight", None)
                if isinstance(weight, nn.Parameter):
                    groups.append(ParamGroup(stack, layer, sublayer, f"{sublayer}_residual.{norm_name}", weight))
    return groups


def _rows(groups: list[ParamGroup], grads: dict[int, Tensor], **extra) -> list[dict]:
    rows = []
    for g in groups:
        grad = grads.get(id(g.weight))
        if grad is None:
            continue
        grad, weight = g.view(grad), g.view(g.weight.detach())
        grad_norm, param_norm = grad.norm().item(), weight.norm().item()
        rows.append({"stack": g.stack, "layer": g.layer, "sublayer": g.sublayer, "param": g.param,
                     "grad_norm": grad_norm, "param_norm": param_norm,
                     "ratio": grad_norm / param_norm if param_norm else float("nan"), "numel": grad.numel(), **extra})
    return rows


def _gradients(model: nn.Module, groups: list[ParamGroup], loss: Tensor) -> dict[int, Tensor]:
    weights = list({id(g.weight): g.weight for g in groups}.values())
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return {id(w): g for w, g in zip(weights, grads) if g is not None}


def gradient_scales(model: nn.Module, batch, loss_fn: Callable[[nn.Module, object], Tensor]) -> list[dict]:
    """Run ``loss_fn(model, batch)``, back-propagate, and report the gradient of every parameter group.

    One row per group with ``stack``, ``layer``, ``sublayer``, ``param``, ``grad_norm`` (Frobenius),
    ``param_norm``, ``ratio`` (grad_norm / param_norm), ``numel`` and ``loss``. The gradients are
    taken with ``torch.autograd.grad``, so the parameters' ``.grad`` fields are left as they were.
    """
    groups = parameter_groups(model)
    if not groups:
        raise ValueError(f"no tformer blocks found inside {type(model).__name__}")
    loss = loss_fn(model, batch)
    return _rows(groups, _gradients(model, groups, loss), loss=loss.item())


def expected_gradient_scales(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor]) -> list[dict]:
    """Xiong et al.'s "scale of the expected gradient": average each gradient over the batches
    elementwise, then take the norm. Rows as in ``gradient_scales``, plus ``mean_grad_norm`` (the
    mean of the per-batch norms) and ``n_batches``."""
    groups = parameter_groups(model)
    if not groups:
        raise ValueError(f"no tformer blocks found inside {type(model).__name__}")
    total: dict[int, Tensor] = {}
    norms: dict[tuple, float] = {}
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        grads = _gradients(model, groups, loss)
        for key, grad in grads.items():
            total[key] = grad if key not in total else total[key] + grad
        for g in groups:
            if id(g.weight) in grads:
                norms[g.key()] = norms.get(g.key(), 0.0) + g.view(grads[id(g.weight)]).norm().item()
    n = len(losses)
    if n == 0:
        raise ValueError("expected_gradient_scales needs at least one batch")
    rows = _rows(groups, {k: v / n for k, v in total.items()}, loss=sum(losses) / n, n_batches=n)
    for row, g in zip(rows, [g for g in groups if id(g.weight) in total]):
        row["mean_grad_norm"] = norms[g.key()] / n
    return rows
