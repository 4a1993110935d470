"""Switching the placement of a built (e.g. converted or trained) model: one call, weights carried over.

``with_placement(model, "sandwich")`` rebuilds the model from its spec with another placement and
copies every weight whose name and shape exist in both (embeddings, attention, feed-forward, norms
that sit at the same name). The function the model computes changes: a Pre-LN model's weights in a
Post-LN or sandwich arrangement are a starting point for fine-tuning, not an equivalent model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .errors import ConfigError


def with_placement(model: nn.Module, placement, **changes) -> nn.Module:
    """A new model like ``model`` but with ``placement`` (a name, class or factory; every layer), weights copied.

    ``changes`` replace other ``BlockConfig`` fields at the same time (e.g. ``norm="rmsnorm"``). Returns the
    new model (same dtype, device and train/eval mode) and leaves ``model`` unchanged. The new model's
    ``carried_over`` and ``initialized`` attributes list which state-dict entries were copied and which
    were freshly initialized (a new placement's extra norms, ReZero's gate, ...).
    """
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(type(model), "from_spec"):
        raise ConfigError(f"with_placement needs a tformer model built from a config, got {type(model).__name__}")
    cfg = dataclasses.replace(spec.cfg, placement=placement, **changes)
    per_layer = {f.name: None for f in dataclasses.fields(spec) if f.name.endswith("placements")}
    new = type(model).from_spec(dataclasses.replace(spec, cfg=cfg, **per_layer))
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    old_state, new_state = model.state_dict(), new.state_dict()
    carried = {k: v for k, v in old_state.items() if k in new_state and new_state[k].shape == v.shape}
    with torch.no_grad():
        new.load_state_dict({**new_state, **carried})
    new.carried_over = sorted(carried)
    new.initialized = sorted(set(new_state) - set(carried))
    return new.train(model.training)
