"""Where the norm sits around a sublayer: one class per placement, one registry.

A placement wraps one sublayer ``F`` (attention, cross-attention or feed-forward) with its
norm(s) and the residual connection. A block calls ``placement(x, F, padding_mask)`` and never
looks at the placement's name, so every norm works with every placement and adding one is a
class plus a ``@register`` line. Placements whose residual stream is more than one tensor
(ResiDual, hyper-connections) are in ``stack_placements.py``; see ``ResidualPlacement``.

Residual-branch dropout is applied to the branch right before it joins the residual, the same
site as ``torch.nn.TransformerEncoderLayer``'s ``dropout1``/``dropout2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .deepnorm import deepnorm_constants
from .errors import ConfigError
from .init import BranchInit
from .registry import Registry

NormFactory = Callable[[], nn.Module]
Sublayer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LayerContext:
    """Where a block sits: its stack, 0-based index, the stack's depth, the paired stack's depth.

    Depth-aware placements read it: DeepNorm's constants depend on the architecture
    (``paired_layers`` is the other stack's depth in an encoder-decoder, 0 for a lone stack),
    Mix-LN and LayerNorm scaling on the layer index. A block built on its own is layer 0 of a
    one-layer stack.
    """

    stack: str = "encoder"
    index: int = 0
    n_layers: int = 1
    paired_layers: int = 0

    def __post_init__(self):
        if self.stack not in ("encoder", "decoder"):
            raise ValueError(f"stack={self.stack!r}; valid choices: 'encoder', 'decoder'")
        if not 0 <= self.index < self.n_layers:
            raise ValueError(f"index={self.index} outside a stack of n_layers={self.n_layers}")

    def deepnorm(self) -> tuple[float, float]:
        """DeepNorm's ``(alpha, beta)`` for this stack in its architecture."""
        if self.stack == "encoder":
            return deepnorm_constants(self.n_layers, self.paired_layers)["encoder"]
        return deepnorm_constants(self.paired_layers, self.n_layers)["decoder"]


class ResidualPlacement(nn.Module):
    """Combines a residual stream ``x`` with one sublayer ``F`` and its norm(s).

    The protocol (what a block and a stack call):

    * ``__init__(make_norm, layer, dropout=0.0)``: ``make_norm()`` builds one norm;
      ``layer`` (a ``LayerContext``) says where the block sits.
    * ``forward(x, sublayer, padding_mask)`` returns the new residual stream, same shape as ``x``
      ``(batch, seq, d_model)``.
    * ``needs_final_norm``: whether a stack ending in this placement needs a closing norm;
      ``branch_init``: how the sublayer's weights are initialized; ``formula``: shown in ``repr``.
    * Stack-level placements carry more than one tensor from layer to layer: their stream is an
      object (``DualStream``, ``HyperStreams``), ``begin(x)`` makes it from the stack's input,
      ``end(stream, final_norm, padding_mask)`` turns it into the stack's output, and ``stream``
      names the kind, which every sublayer of a stack must share. For one-tensor placements
      ``begin`` is the identity and ``end`` applies the final norm.
    """

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    needs_final_norm: ClassVar[bool] = False
    stream: ClassVar[str] = "tensor"

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.branch_init = BranchInit()

    def forward(self, x: Tensor, sublayer: Sublayer, padding_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def begin(self, x: Tensor):
        """The residual stream a stack starts from, given its input ``x`` (batch, seq, d_model)."""
        return x

    def end(self, stream, final_norm: nn.Module | None, padding_mask: Tensor | None = None) -> Tensor:
        """The stack's output from its last stream, closed by ``final_norm`` where there is one."""
        return stream if final_norm is None else final_norm(stream, padding_mask)

    def extra_repr(self) -> str:
        return self.formula


class SingleNormPlacement(ResidualPlacement):
    """A placement with one norm, ``self.norm``."""

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.norm = make_norm()


def stream_tensor(stream) -> Tensor:
    """The ``(batch, seq, d_model)`` tensor that stands for a residual stream (for monitors and checks)."""
    return getattr(stream, "hidden", stream)  # a tensor (or anything else, for the caller to reject) as is


Builder = Callable[[NormFactory, LayerContext, float], ResidualPlacement]
PLACEMENTS: Registry[Builder] = Registry("placement")


def register(cls: type[ResidualPlacement]) -> type[ResidualPlacement]:
    """Register a placement class under its ``name``."""
    return PLACEMENTS.register(cls.name)(cls)


@register
class PostNorm(SingleNormPlacement):
    """Post-LN, the original Transformer (Vaswani et al. 2017): ``x <- Norm(x + F(x))``."""

    name = "post"
    formula = "x <- Norm(x + F(x))"

    def forward(self, x, sublayer, padding_mask=None):
        return self.norm(x + self.dropout(sublayer(x)), padding_mask)


@register
class PreNorm(SingleNormPlacement):
    """Pre-LN (Xiong et al. 2020): ``x <- x + F(Norm(x))``; the stack closes with a final norm."""

    name = "pre"
    formula = "x <- x + F(Norm(x))"
    needs_final_norm = True

    def forward(self, x, sublayer, padding_mask=None):
        return x + self.dropout(sublayer(self.norm(x, padding_mask)))


@register
class SandwichNorm(ResidualPlacement):
    """Sandwich-LN (Ding et al. 2021, CogView; Peri-LN): ``x <- x + Norm_out(F(Norm_in(x)))``."""

    name = "sandwich"
    formula = "x <- x + Norm_out(F(Norm_in(x)))"
    needs_final_norm = True

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.norm_in = make_norm()
        self.norm_out = make_norm()

    def forward(self, x, sublayer, padding_mask=None):
        branch = self.norm_out(sublayer(self.norm_in(x, padding_mask)), padding_mask)
        return x + self.dropout(branch)


@register
class DeepNorm(SingleNormPlacement):
    """DeepNorm (Wang et al. 2022): ``x <- Norm(alpha * x + F(x))``, branch init Xavier-normal gain beta.

    alpha scales the residual ``x``, not ``F(x)``; both constants come from the layer's stack
    and architecture (``deepnorm_constants``).
    """

    name = "deepnorm"
    formula = "x <- Norm(alpha * x + F(x))"

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.alpha, beta = layer.deepnorm()
        self.branch_init = BranchInit(gain=beta, normal=True)

    def forward(self, x, sublayer, padding_mask=None):
        return self.norm(self.alpha * x + self.dropout(sublayer(x)), padding_mask)

    def extra_repr(self) -> str:
        return f"{self.formula}, alpha={self.alpha:.4f}, beta={self.branch_init.gain:.4f}"


@register
class OutputNorm(SingleNormPlacement):
    """Output-only ("reordered") norm, OLMo 2: ``x <- x + Norm(F(x))``; the stack closes with a final norm."""

    name = "output"
    formula = "x <- x + Norm(F(x))"
    needs_final_norm = True

    def forward(self, x, sublayer, padding_mask=None):
        return x + self.dropout(self.norm(sublayer(x), padding_mask))


@register
class ReZero(ResidualPlacement):
    """ReZero (Bachlechner et al. 2020): ``x <- x + a * F(x)``, scalar ``a`` initialized to 0, no norm.

    The configured norm is not used: ReZero replaces normalization altogether.
    """

    name = "rezero"
    formula = "x <- x + a * F(x)"

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.resweight = nn.Parameter(torch.zeros(()))

    def forward(self, x, sublayer, padding_mask=None):
        return x + self.resweight * self.dropout(sublayer(x))


@register
class ScaledPreNorm(SingleNormPlacement):
    """LayerNorm scaling (Sun et al. 2025): Pre-LN with the norm output scaled by ``1/sqrt(l)``.

    ``l`` is the 1-based layer index; the stack's final norm is not scaled.
    """

    name = "lnscaling"
    formula = "x <- x + F(Norm(x) / sqrt(l))"
    needs_final_norm = True

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.scale = 1.0 / math.sqrt(layer.index + 1)

    def forward(self, x, sublayer, padding_mask=None):
        return x + self.dropout(sublayer(self.norm(x, padding_mask) * self.scale))

    def extra_repr(self) -> str:
        return f"{self.formula}, scale={self.scale:.4f}"


MIXLN_POST_FRACTION = 0.25


@PLACEMENTS.register("mixln")
def mix_ln(make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0) -> ResidualPlacement:
    """Mix-LN (Li et al. 2024): Post-LN in the first ``floor(0.25 * L)`` layers, Pre-LN after."""
    n_post = math.floor(MIXLN_POST_FRACTION * layer.n_layers)
    placement = PostNorm if layer.index < n_post else PreNorm
    return placement(make_norm, layer, dropout)


def build_placement(spec, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0) -> ResidualPlacement:
    """Build the placement ``spec`` (a registered name, a class or a factory) for one sublayer of ``layer``."""
    placement = PLACEMENTS.resolve(spec)(make_norm, layer, dropout)
    if not isinstance(placement, ResidualPlacement):
        raise ConfigError(
            f"placement={spec!r} built a {type(placement).__name__}; a placement must be a "
            f"tformer.ResidualPlacement (see tformer.placements for the protocol)"
        )
    return placement

