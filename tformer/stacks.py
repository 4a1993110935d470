"""Stacks of blocks: ``Encoder`` and ``Decoder``, with a final norm where the placement needs one.

A stack starts its placements' residual stream from its input (``begin``), passes the stream
through every block, and turns it into its output at the end (``end``, which applies the final
norm). For one-tensor placements the stream is the tensor itself; stack-level placements
(ResiDual, hyper-connections) carry more, see ``tformer.stack_placements``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import KVCache
from .blocks import (DecoderBlock, EncoderBlock, TransformerBlock, check_finite, check_inputs, debug_mode,
                     reject_arguments)
from .config import BlockConfig, check_positive_int
from .errors import ConfigError
from .packing import Packing
from .placements import LayerContext
from .spec import BuiltFromSpec, Spec


def _layer_configs(cfg: BlockConfig, n_layers: int, placements: Sequence | None) -> list[BlockConfig]:
    check_positive_int("n_layers", n_layers)
    if placements is None:
        return [cfg] * n_layers
    if isinstance(placements, str) or len(placements) != n_layers:
        raise ConfigError(f"placements must be a list of {n_layers} placement names (one per layer), got {placements!r}")
    return [dataclasses.replace(cfg, placement=p) for p in placements]


def _check_final_norm(final_norm) -> None:
    if final_norm is not None and not isinstance(final_norm, bool):
        raise ConfigError(f"final_norm={final_norm!r} must be None (where the last placement needs one), True or False")


class _Stack(BuiltFromSpec, nn.Module):
    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        stack: str,
        paired_layers: int,
        placements: Sequence | None,
        final_norm: bool | None,
        make_block: Callable[[BlockConfig, LayerContext], TransformerBlock],
    ):
        super().__init__()
        if not isinstance(cfg, BlockConfig):
            raise TypeError(f"expected a tformer.BlockConfig, got {type(cfg).__name__}")
        _check_final_norm(final_norm)
        self.cfg = cfg
        configs = _layer_configs(cfg, n_layers, placements)
        self.layers = nn.ModuleList(
            make_block(layer_cfg, LayerContext(stack, i, n_layers, paired_layers))
            for i, layer_cfg in enumerate(configs)
        )
        streams = [block.stream for block in self.layers]
        if len(set(streams)) > 1:
            raise ConfigError(
                f"the layers' placements carry different residual streams ({', '.join(dict.fromkeys(streams))}): "
                f"a stack-level placement such as ResiDual cannot be mixed with other placements in one stack"
            )
        wanted = self.layers[-1].needs_final_norm if final_norm is None else final_norm
        self.final_norm = cfg.norm_factory()() if wanted else None
        #: recompute each block's activations in backward instead of storing them (training only; the
        #: trainer's ``train.activation_checkpointing``): same values and gradients, less memory
        self.activation_checkpointing = False
        #: run a padded batch on its real tokens only (``tformer.packing``): packed at the entry, unpacked
        #: (zeros at padding) at the exit; the same outputs at real positions to float rounding
        self.pack_padding = True

    @property
    def placements(self) -> list[str]:
        """The placement each layer runs (Mix-LN resolved to its per-layer post/pre)."""
        return [block.ffn_residual.name or type(block.ffn_residual).__name__ for block in self.layers]

    def packing_for(self, x: Tensor, padding_mask: Tensor | None, cache: KVCache | None = None) -> Packing | None:
        """The ``Packing`` this stack runs ``x`` with, or None to run it padded: packing needs ``pack_padding``,
        a padding mask with some (not only) padding, no KV cache, and blocks that support it."""
        if not self.pack_padding or padding_mask is None or cache is not None or torch.compiler.is_compiling():
            return None  # compiled graphs run padded: packing's shapes depend on the mask's values
        check_inputs(x, padding_mask, self.cfg.d_model)
        padded = int(padding_mask.sum())
        if padded in (0, padding_mask.numel()) or not all(block.supports_packing for block in self.layers):
            return None
        return Packing(padding_mask)

    def _run(self, x: Tensor, padding_mask: Tensor | None, **block_kwargs) -> Tensor:
        # validated once here (shapes, dtypes, masks; with debug checks, finiteness), not again per layer
        debug = debug_mode()
        name = type(self).__name__
        self.layers[0].check_input(x, padding_mask, block_kwargs.get("memory"), block_kwargs.get("memory_padding_mask"),
                                   where=name, debug=debug)
        packing = self.packing_for(x, padding_mask, block_kwargs.get("cache"))
        if packing is not None:
            x, padding_mask, block_kwargs["packing"] = packing.pack(x), None, packing
        stream = self.layers[0].begin(x)
        cache = block_kwargs.pop("cache", None)
        block_kwargs["_checked"] = True
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if cache is not None:
                block_kwargs["cache"] = cache.layers[i]
            if checkpointed:
                stream = torch.utils.checkpoint.checkpoint(block, stream, padding_mask=padding_mask, use_reentrant=False,
                                                           **block_kwargs)
            else:
                stream = block(stream, padding_mask=padding_mask, **block_kwargs)
            if debug == "blocks":
                check_finite(getattr(stream, "hidden", stream), f"the output of layer {i} of this {name} "
                             f"({type(block).__name__}, placement {block.ffn_residual.name or type(block.ffn_residual).__name__})")
        out = self.layers[-1].end(stream, self.final_norm, padding_mask)
        if debug == "blocks":
            check_finite(out, f"the output of this {name} (after its final norm)")
        return out if packing is None else packing.unpack(out)


@dataclass(frozen=True)
class EncoderSpec(Spec):
    cfg: BlockConfig
    n_layers: int
    placements: tuple | None = None
    n_decoder_layers: int = 0
    final_norm: bool | None = None
    rope: bool = False


class Encoder(_Stack):
    """``n_layers`` ``EncoderBlock`` layers, closed by a final norm when the last placement needs it.

    ``placements`` gives one placement per layer (otherwise every layer uses ``cfg.placement``).
    ``n_decoder_layers`` is the depth of the decoder this encoder feeds in an encoder-decoder
    model (DeepNorm's constants depend on it), 0 for an encoder-only model. ``final_norm``: None
    adds the closing norm exactly when the last placement needs one; False never (x-transformers'
    ``pre_norm_has_final_norm=False``); True always. ``rope``: rotary positions in self-attention.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        *,
        placements: Sequence | None = None,
        n_decoder_layers: int = 0,
        final_norm: bool | None = None,
        rope: bool = False,
    ):
        super().__init__(
            cfg, n_layers, "encoder", n_decoder_layers, placements, final_norm,
            lambda c, layer: EncoderBlock(c, layer=layer, rope=rope),
        )
        self.spec = EncoderSpec(cfg, n_layers, placements, n_decoder_layers, final_norm, rope)


    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, **unexpected) -> Tensor:
        """``x``: (batch, seq, d_model) -> (batch, seq, d_model)."""
        reject_arguments(unexpected, "Encoder.forward", ("x", "padding_mask"))
        return self._run(x, padding_mask)


@dataclass(frozen=True)
class DecoderSpec(Spec):
    cfg: BlockConfig
    n_layers: int
    cross_attention: bool = True
    placements: tuple | None = None
    n_encoder_layers: int = 0
    final_norm: bool | None = None
    causal: bool = True
    rope: bool = False


class Decoder(_Stack):
    """``n_layers`` ``DecoderBlock`` layers (causal self-attention unless ``causal=False``, optional cross-attention).

    ``n_encoder_layers`` is the depth of the encoder in an encoder-decoder model, 0 for a
    decoder-only model (DeepNorm's constants depend on it). ``final_norm`` as for ``Encoder``.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        cross_attention: bool = True,
        *,
        placements: Sequence | None = None,
        n_encoder_layers: int = 0,
        final_norm: bool | None = None,
        causal: bool = True,
        rope: bool = False,
    ):
        super().__init__(
            cfg, n_layers, "decoder", n_encoder_layers, placements, final_norm,
            lambda c, layer: DecoderBlock(c, cross_attention, causal=causal, layer=layer, rope=rope),
        )
        self.cross_attention = cross_attention
        self.spec = DecoderSpec(cfg, n_layers, cross_attention, placements, n_encoder_layers, final_norm, causal, rope)


    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        **unexpected,
    ) -> Tensor:
        """``x``: (batch, seq, d_model); ``memory``: (batch, mem_seq, d_model) with cross-attention.

        ``cache`` (a ``KVCache`` with one entry per layer) makes decoding incremental.
        """
        reject_arguments(unexpected, "Decoder.forward", ("x", "padding_mask", "memory", "memory_padding_mask", "cache"))
        return self._run(x, padding_mask, memory=memory, memory_padding_mask=memory_padding_mask, cache=cache)
