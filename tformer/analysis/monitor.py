"""A training-time monitor: attach with one call, detach with one call, nothing left behind.

Every ``every`` optimizer steps it records, as flat JSONL-ready rows:

* ``grad_norm``: each parameter group's gradient norm as the optimizer sees it (after clipping);
* ``update_ratio``: ``||W_after - W_before|| / ||W_before||`` from the optimizer's actual step;
* ``residual_norm``: ``E||x_l||^2 / d`` of each block's output over the non-padding tokens;
* ``attention_entropy``: ``-sum_j A_ij log A_ij`` averaged over the queries of the batch's first
  sequence, per layer and head (Zhai et al. 2023), recomputed from the module's own projections;
* ``gns``: the gradient noise scale estimated from the norm layers' per-example gradient norms
  (Gray et al. 2024): with batch size ``b``, ``S_B = ||mean_i g_i||^2`` and
  ``S_1 = mean_i ||g_i||^2`` over the norms' gains and biases,
  ``|G|^2 = (b S_B - S_1) / (b - 1)``, ``tr(Sigma) = (S_1 - S_B) / (1 - 1/b)``,
  ``GNS = EMA(tr Sigma) / EMA(|G|^2)``. It assumes the loss is a mean over examples (true of the
  LM recipe); PowerNorm's batch statistics couple examples, so there it is an approximation.

Between logging steps the hooks return at once; ``detach()`` removes every hook it registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attention import MultiHeadAttention
from ..config import check_positive_int
from ..placements import stream_tensor
from ..stacks import _Stack
from .scales import find_blocks, parameter_groups


class TrainingMonitor:
    """Collects training-health rows every ``every`` steps of ``optimizer`` (see the module docstring).

    ``monitor = TrainingMonitor(model, optimizer, every=10, path="monitor.jsonl").attach()``;
    train as usual; ``monitor.detach()``. Rows accumulate in ``monitor.rows`` and, with ``path``,
    are appended to a JSONL file (or passed to ``sink``). Without an optimizer, call
    ``monitor.step()`` after each optimizer step (update ratios then need the optimizer).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 10,
        path: str | Path | None = None,
        sink: Callable[[dict], None] | None = None,
        attention_entropy: bool = True,
        gns: bool = True,
        ema: float = 0.9,
        max_entropy_queries: int = 128,
        start_step: int = 0,
    ):
        check_positive_int("every", every)
        self.model, self.optimizer, self.every = model, optimizer, every
        self.path = None if path is None else Path(path)
        self.sink = sink
        self.attention_entropy, self.gns, self.ema = attention_entropy, gns, ema
        self.max_entropy_queries = max_entropy_queries
        self.step_count = start_step
        self.rows: list[dict] = []
        self.groups = parameter_groups(model)
        self.blocks = find_blocks(model)
        if not self.blocks:
            raise ValueError(f"no tformer blocks found inside {type(model).__name__}")
        self._handles: list = []
        self._packing_was: dict[nn.Module, bool] = {}
        self._armed = False
        self._captured: list[dict] = []
        self._per_example: dict[str, list[Tensor]] = {}
        self._batch_size: int | None = None
        self._snapshot: dict[int, Tensor] = {}
        self._ema_g2: float | None = None
        self._ema_trace: float | None = None

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> TrainingMonitor:
        """Register the hooks; returns ``self``."""
        if self._handles:
            return self
        # the hooks read (batch, seq) tensors and per-example gradients: watched stacks run padded batches padded
        self._packing_was = {stack: stack.pack_padding for stack in self.model.modules() if isinstance(stack, _Stack)}
        for stack in self._packing_was:
            stack.pack_padding = False
        for stack, layer, _, block in self.blocks:
            self._handles.append(block.register_forward_hook(self._residual_hook(stack, layer), with_kwargs=True))
            if self.attention_entropy:
                for sublayer, (module, _) in block.residual_sublayers().items():
                    if isinstance(module, MultiHeadAttention):
                        hook = self._entropy_hook(stack, layer, sublayer)
                        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if self.gns:
                for sublayer, (_, placement) in block.residual_sublayers().items():
                    for norm_name, norm in placement.named_children():
                        if isinstance(getattr(norm, "weight", None), nn.Parameter):
                            key = f"{stack}.{layer}.{sublayer}_residual.{norm_name}"
                            self._handles.append(norm.register_forward_hook(self._norm_hook(key)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step()))
            self._handles.append(self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step()))
        self._arm()
        return self

    def detach(self) -> None:
        """Remove every hook; the model and optimizer run exactly as before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for stack, packing in self._packing_was.items():
            stack.pack_padding = packing
        self._packing_was = {}
        self._armed = False
        self._captured.clear()
        self._per_example.clear()
        self._snapshot.clear()

    def __enter__(self) -> TrainingMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def step(self) -> None:
        """Count an optimizer step when no optimizer was given (and record if it was a logging step)."""
        if self.optimizer is not None:
            raise RuntimeError("this monitor counts steps through its optimizer's hooks; do not call step()")
        self._before_step()
        self._after_step()

    # ------------------------------------------------------------------ hooks

    def _arm(self) -> None:
        self._armed = (self.step_count + 1) % self.every == 0

    def _capturing(self, module: nn.Module) -> bool:
        return self._armed and module.training and torch.is_grad_enabled()

    def _residual_hook(self, stack: str, layer: int):
        def hook(module, args, kwargs, output):
            if not self._capturing(module):
                return
            with torch.no_grad():
                squares = stream_tensor(output).detach().float().pow(2).mean(-1)  # (batch, seq): ||x||^2 / d
                pad = kwargs.get("padding_mask")
                value = squares[~pad].mean() if pad is not None else squares.mean()
            self._captured.append({"metric": "residual_norm", "stack": stack, "layer": layer, "value": value.item()})
        return hook

    def _entropy_hook(self, stack: str, layer: int, sublayer: str):
        def hook(module: MultiHeadAttention, args, kwargs, output):
            if not self._capturing(module):
                return
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                entropy = attention_entropy(module, x[:1], padding_mask=_first(kwargs.get("padding_mask")),
                                            memory=_first(kwargs.get("memory")),
                                            memory_padding_mask=_first(kwargs.get("memory_padding_mask")),
                                            max_queries=self.max_entropy_queries)
            for head, value in enumerate(entropy.tolist()):
                self._captured.append({"metric": "attention_entropy", "stack": stack, "layer": layer,
                                       "sublayer": sublayer, "head": head, "value": value})
        return hook

    def _norm_hook(self, key: str):
        def hook(module, args, output):
            if not self._capturing(module) or not output.requires_grad:
                return
            weight = module.weight.detach()
            if weight.abs().min() < 1e-6:
                return  # cannot recover the normalized input through a zero gain
            bias = getattr(module, "bias", None)
            shifted = output.detach() if bias is None else output.detach() - bias.detach()
            normalized = (shifted / weight).float()
            self._batch_size = output.shape[0]

            def on_grad(grad_out: Tensor):
                grad = grad_out.detach().float()
                per_example = [(grad * normalized).flatten(1, -2).sum(1)]  # (batch, d): d loss / d gain
                if bias is not None:
                    per_example.append(grad.flatten(1, -2).sum(1))
                self._per_example.setdefault(key, []).extend(per_example)

            output.register_hook(on_grad)
        return hook

    def _before_step(self) -> None:
        if not self._armed:
            return
        for g in self.groups:
            if g.weight.grad is not None:
                self._captured.append(_group_row(g, "grad_norm", g.view(_full(g.weight.grad)).norm().item()))
            self._snapshot[id(g)] = g.view(_full(g.weight.detach())).clone()

    def _after_step(self) -> None:
        self.step_count += 1
        if self._armed:
            rows = list(self._captured)
            if self.optimizer is not None:
                for g in self.groups:
                    before = self._snapshot.get(id(g))
                    if before is not None:
                        after = g.view(_full(g.weight.detach()))
                        ratio = (after - before).norm().item() / max(before.norm().item(), 1e-12)
                        rows.append(_group_row(g, "update_ratio", ratio))
            if self.gns and self._per_example:
                rows.extend(self._gns_rows())
            for row in rows:
                self._emit({"step": self.step_count, **row})
            self._captured.clear()
            self._per_example.clear()
            self._snapshot.clear()
        self._arm()

    def _gns_rows(self) -> list[dict]:
        b = self._batch_size
        if not b or b < 2:
            return []
        grads = torch.cat([g for parts in self._per_example.values() for g in parts], dim=1) * b  # (b, n_params)
        s_1 = grads.pow(2).sum(1).mean().item()
        s_b = grads.mean(0).pow(2).sum().item()
        g2 = (b * s_b - s_1) / (b - 1)
        trace = (s_1 - s_b) / (1 - 1 / b)
        self._ema_g2 = g2 if self._ema_g2 is None else self.ema * self._ema_g2 + (1 - self.ema) * g2
        self._ema_trace = trace if self._ema_trace is None else self.ema * self._ema_trace + (1 - self.ema) * trace
        gns = self._ema_trace / self._ema_g2 if self._ema_g2 > 0 else None  # not yet estimable: |G|^2 <= 0
        return [{"metric": "gns", "value": gns, "g2": g2, "trace_sigma": trace, "s_1": s_1, "s_b": s_b, "batch": b}]

    def _emit(self, row: dict) -> None:
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _full(t: Tensor) -> Tensor:
    """A sharded (FSDP2 DTensor) parameter or gradient gathered whole, on every rank; any other as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _first(t: Tensor | None) -> Tensor | None:
    return None if t is None else t[:1]


def _group_row(g, metric: str, value: float) -> dict:
    return {"metric": metric, "stack": g.stack, "layer": g.layer, "sublayer": g.sublayer, "param": g.param, "value": value}


@torch.no_grad()
def attention_entropy(
    attn: MultiHeadAttention, x: Tensor, *, padding_mask: Tensor | None = None, memory: Tensor | None = None,
    memory_padding_mask: Tensor | None = None, max_queries: int | None = None,
) -> Tensor:
    """Entropy of ``attn``'s attention distributions, averaged over the (non-padding) queries of all
    sequences in ``x``: one value per head, in nats. The probabilities are the module's own
    (``MultiHeadAttention.attention_probs``: same projections, QK-norm and masks as its forward)."""
    probs = attn.attention_probs(x, padding_mask=padding_mask, memory=memory, memory_padding_mask=memory_padding_mask)
    q_len = probs.shape[2]
    queries = torch.arange(q_len, device=x.device)
    if max_queries is not None and q_len > max_queries:
        queries = torch.linspace(0, q_len - 1, max_queries, device=x.device).round().long()
    probs = probs[:, :, queries]  # (batch, heads, queries, kv_len)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (batch, heads, queries)
    real = torch.ones(x.shape[0], len(queries), dtype=torch.bool, device=x.device)
    if padding_mask is not None and not attn.cross:
        real &= ~padding_mask[:, queries]
    return (entropy * real[:, None]).sum((0, 2)) / real.sum().clamp_min(1)
