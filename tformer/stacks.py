"""Stacks of blocks: ``Encoder`` and ``Decoder``, with a final norm where the placement needs one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .attention import KVCache
from .blocks import DecoderBlock, EncoderBlock, TransformerBlock
from .config import BlockConfig, check_positive_int
from .errors import ConfigError
from .placements import LayerContext


def _layer_configs(cfg: BlockConfig, n_layers: int, placements: Sequence[str] | None) -> list[BlockConfig]:
    check_positive_int("n_layers", n_layers)
    if placements is None:
        return [cfg] * n_layers
    if isinstance(placements, str) or len(placements) != n_layers:
        raise ConfigError(f"placements must be a list of {n_layers} placement names (one per layer), got {placements!r}")
    return [dataclasses.replace(cfg, placement=p) for p in placements]


class _Stack(nn.Module):
    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        stack: str,
        paired_layers: int,
        placements: Sequence[str] | None,
        make_block: Callable[[BlockConfig, LayerContext], TransformerBlock],
    ):
        super().__init__()
        self.cfg = cfg
        configs = _layer_configs(cfg, n_layers, placements)
        self.layers = nn.ModuleList(
            make_block(layer_cfg, LayerContext(stack, i, n_layers, paired_layers))
            for i, layer_cfg in enumerate(configs)
        )
        self.final_norm = cfg.norm_factory()() if self.layers[-1].needs_final_norm else None

    @property
    def placements(self) -> list[str]:
        """The placement each layer runs (Mix-LN resolved to its per-layer post/pre)."""
        return [block.ffn_residual.name for block in self.layers]

    def _finish(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        return x if self.final_norm is None else self.final_norm(x, padding_mask)


class Encoder(_Stack):
    """``n_layers`` ``EncoderBlock``s, closed by a final norm when the last placement needs it.

    ``placements`` gives one placement name per layer (otherwise every layer uses
    ``cfg.placement``). ``n_decoder_layers`` is the depth of the decoder this encoder feeds in
    an encoder-decoder model (DeepNorm's constants depend on it), 0 for an encoder-only model.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        *,
        placements: Sequence[str] | None = None,
        n_decoder_layers: int = 0,
    ):
        super().__init__(
            cfg, n_layers, "encoder", n_decoder_layers, placements,
            lambda c, layer: EncoderBlock(c, layer=layer),
        )
        self.init_args = dict(n_layers=n_layers, placements=placements, n_decoder_layers=n_decoder_layers)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        """``x``: (batch, seq, d_model) -> (batch, seq, d_model)."""
        for block in self.layers:
            x = block(x, padding_mask=padding_mask)
        return self._finish(x, padding_mask)


class Decoder(_Stack):
    """``n_layers`` ``DecoderBlock``s (causal self-attention, optional cross-attention).

    ``n_encoder_layers`` is the depth of the encoder in an encoder-decoder model, 0 for a
    decoder-only model (DeepNorm's constants depend on it).
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        cross_attention: bool = True,
        *,
        placements: Sequence[str] | None = None,
        n_encoder_layers: int = 0,
    ):
        super().__init__(
            cfg, n_layers, "decoder", n_encoder_layers, placements,
            lambda c, layer: DecoderBlock(c, cross_attention, layer=layer),
        )
        self.cross_attention = cross_attention
        self.init_args = dict(n_layers=n_layers, cross_attention=cross_attention, placements=placements,
                              n_encoder_layers=n_encoder_layers)

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """``x``: (batch, seq, d_model); ``memory``: (batch, mem_seq, d_model) with cross-attention.

        ``cache`` (a ``KVCache`` with one entry per layer) makes decoding incremental.
        """
        for i, block in enumerate(self.layers):
            x = block(x, padding_mask=padding_mask, memory=memory, memory_padding_mask=memory_padding_mask,
                      cache=None if cache is None else cache.layers[i])
        return self._finish(x, padding_mask)
