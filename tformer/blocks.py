"""Encoder and decoder blocks: sublayers composed with their residual placements.

A block owns its sublayers (``attn``, ``cross_attn``, ``ffn``) and one placement per sublayer
(``attn_residual``, ``cross_attn_residual``, ``ffn_residual``) that holds the norm(s) and
combines the branch with the residual stream. The block never branches on the placement.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .attention import LayerKV, MultiHeadAttention
from .config import BlockConfig
from .feedforward import FeedForward
from .placements import LayerContext, ResidualPlacement, build_placement


def check_inputs(x: Tensor, padding_mask: Tensor | None, d_model: int, what: str = "x") -> None:
    """Raise a clear error for a wrongly shaped input or a padding mask that is not (batch, seq) bool."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{what} must have shape (batch, seq, {d_model}), got {tuple(x.shape)}")
    if padding_mask is not None:
        if padding_mask.dtype != torch.bool:
            raise TypeError(f"the padding mask for {what} must be a bool tensor (True = padding), got {padding_mask.dtype}")
        if tuple(padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"the padding mask for {what} must have shape (batch, seq) = {tuple(x.shape[:2])}, "
                f"got {tuple(padding_mask.shape)}"
            )


class TransformerBlock(nn.Module):
    """Common parts of encoder and decoder blocks."""

    #: Sublayer names in forward order; each ``name`` has a placement ``name + "_residual"``.
    sublayer_names: tuple[str, ...] = ()

    def __init__(self, cfg: BlockConfig, layer: LayerContext):
        super().__init__()
        if not isinstance(cfg, BlockConfig):
            raise TypeError(f"expected a tformer.BlockConfig, got {type(cfg).__name__}")
        self.cfg, self.layer = cfg, layer
        self.init_args = {"layer": layer}

    def _placement(self) -> ResidualPlacement:
        return build_placement(self.cfg.placement, self.cfg.norm_factory(), self.layer, self.cfg.dropout)

    def residual_sublayers(self) -> dict[str, tuple[nn.Module, ResidualPlacement]]:
        """``{sublayer name: (sublayer module, its placement)}`` in forward order."""
        return {name: (getattr(self, name), getattr(self, f"{name}_residual")) for name in self.sublayer_names}

    @property
    def needs_final_norm(self) -> bool:
        """Whether a stack ending with this block needs a closing norm (Pre-LN, sandwich, ...)."""
        last = self.sublayer_names[-1]
        return getattr(self, f"{last}_residual").needs_final_norm

    def reset_parameters(self) -> None:
        """Initialize every sublayer with its placement's branch init (DeepNorm's beta, ...)."""
        for sublayer, placement in self.residual_sublayers().values():
            sublayer.reset_parameters(placement.branch_init)


class EncoderBlock(TransformerBlock):
    """Self-attention then feed-forward, each wrapped by ``cfg.placement`` with ``cfg.norm``.

    ``forward(x, padding_mask=None)``: ``x`` (batch, seq, d_model), ``padding_mask`` (batch, seq)
    bool, True at padding; returns (batch, seq, d_model). ``layer`` places the block in a stack
    (depth-aware placements read it); on its own it is layer 0 of a one-layer encoder.
    """

    sublayer_names = ("attn", "ffn")

    def __init__(self, cfg: BlockConfig, *, layer: LayerContext | None = None):
        super().__init__(cfg, layer or LayerContext("encoder"))
        self.attn = MultiHeadAttention(cfg)
        self.attn_residual = self._placement()
        self.ffn = FeedForward(cfg)
        self.ffn_residual = self._placement()
        self.reset_parameters()

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        check_inputs(x, padding_mask, self.cfg.d_model)
        x = self.attn_residual(x, partial(self.attn, padding_mask=padding_mask), padding_mask)
        return self.ffn_residual(x, self.ffn, padding_mask)


class DecoderBlock(TransformerBlock):
    """Causal self-attention, optional cross-attention to ``memory``, then feed-forward.

    ``forward(x, padding_mask=None, memory=None, memory_padding_mask=None, cache=None)``: ``x``
    (batch, seq, d_model); ``memory`` (batch, mem_seq, d_model) is required with
    ``cross_attention=True``; ``cache`` (a ``LayerKV``) makes self-attention incremental.
    """

    def __init__(self, cfg: BlockConfig, cross_attention: bool = True, *, layer: LayerContext | None = None):
        super().__init__(cfg, layer or LayerContext("decoder"))
        self.init_args["cross_attention"] = cross_attention
        self.sublayer_names = ("attn", "cross_attn", "ffn") if cross_attention else ("attn", "ffn")
        self.attn = MultiHeadAttention(cfg, causal=True)
        self.attn_residual = self._placement()
        if cross_attention:
            self.cross_attn = MultiHeadAttention(cfg, cross=True)
            self.cross_attn_residual = self._placement()
        self.ffn = FeedForward(cfg)
        self.ffn_residual = self._placement()
        self.reset_parameters()

    @property
    def has_cross_attention(self) -> bool:
        return "cross_attn" in self.sublayer_names

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        check_inputs(x, padding_mask, self.cfg.d_model)
        x = self.attn_residual(x, partial(self.attn, padding_mask=padding_mask, cache=cache), padding_mask)
        if self.has_cross_attention:
            if memory is None:
                raise ValueError("this DecoderBlock has cross-attention and needs `memory`, got None")
            check_inputs(memory, memory_padding_mask, self.cfg.d_model, what="memory")
            cross = partial(self.cross_attn, memory=memory, memory_padding_mask=memory_padding_mask)
            x = self.cross_attn_residual(x, cross, padding_mask)
        elif memory is not None:
            raise ValueError("this DecoderBlock was built with cross_attention=False; it takes no `memory`")
        return self.ffn_residual(x, self.ffn, padding_mask)
