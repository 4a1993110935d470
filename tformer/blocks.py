"""Encoder and decoder blocks: sublayers composed with their residual placements.

A block holds its sublayers (``attn``, ``cross_attn``, ``ffn``) and one placement per sublayer
(``attn_residual``, ``cross_attn_residual``, ``ffn_residual``) that holds the norm(s) and
combines the branch with the residual stream. The block never branches on the placement.

Parts are injected (torchtune's pattern): ``EncoderBlock(cfg)`` builds every part from a
``BlockConfig``; any part passed in (``attn=``, ``ffn=``, ``attn_residual=``, ...) is used as it
is, so a user's own attention or feed-forward module runs inside every placement. A part passed
in keeps its weights: the block initializes only the parts it builds (with the placement's
branch init, e.g. DeepNorm's beta).

Call signatures a part must accept:

* self-attention: ``attn(x, padding_mask=...)`` (plus ``cache=`` while decoding with a KV cache);
* cross-attention: ``cross_attn(x, memory=..., memory_padding_mask=...)``;
* feed-forward: ``ffn(x)``;
each ``(batch, seq, d_model) -> (batch, seq, d_model)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .attention import LayerKV, MultiHeadAttention
from .config import BlockConfig
from .errors import ConfigError, UnsupportedArgumentError
from .feedforward import FeedForward
from .packing import Packing
from .placements import LayerContext, ResidualPlacement, build_placement, stream_tensor
from .spec import BuiltFromSpec, Spec

#: torch.nn's Transformer keyword arguments, and what to pass to tformer instead.
TORCH_ARGUMENTS = {
    "src_key_padding_mask": "padding_mask= (same convention: True marks padding)",
    "tgt_key_padding_mask": "padding_mask= (same convention: True marks padding)",
    "memory_key_padding_mask": "memory_padding_mask= (same convention: True marks padding)",
    "tgt_mask": "nothing: causality is a block option, DecoderBlock(cfg, causal=True) (from_torch(layer, "
                "causal=True)); other attention masks are not supported, only padding masks",
    "is_causal": "nothing: causality is a block option, DecoderBlock(cfg, causal=True)",
    "tgt_is_causal": "nothing: causality is a block option, DecoderBlock(cfg, causal=True)",
    "src_mask": "padding_mask= for padding; arbitrary attention masks are not supported",
    "mask": "padding_mask= for padding; arbitrary attention masks are not supported",
    "memory_mask": "memory_padding_mask= for padding; arbitrary attention masks are not supported",
    "memory_is_causal": "nothing: cross-attention is never causal in tformer",
    "key_padding_mask": "padding_mask= (same convention: True marks padding)",
}


def reject_arguments(unexpected: dict, where: str, valid: tuple[str, ...]) -> None:
    """Raise ``UnsupportedArgumentError`` for keyword arguments ``where`` does not take, naming what to pass."""
    if not unexpected:
        return
    name = next(iter(unexpected))
    instead = TORCH_ARGUMENTS.get(name)
    hint = f"; pass {instead}" if instead else ""
    raise UnsupportedArgumentError(
        f"{where}() got the unsupported argument {name!r}{hint}. It takes {', '.join(valid)}"
    )


def check_inputs(x: Tensor, padding_mask: Tensor | None, d_model: int | None, what: str = "x") -> None:
    """Raise a clear error for a wrongly shaped input or a padding mask that is not (batch, seq) bool."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor of shape (batch, seq, d_model), got {type(x).__name__}")
    if x.dim() != 3 or (d_model is not None and x.shape[-1] != d_model):
        raise ValueError(f"{what} must have shape (batch, seq, {d_model or 'd_model'}), got {tuple(x.shape)}")
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
            raise TypeError(f"the padding mask for {what} must be a bool tensor (True = padding), got {got}")
        if tuple(padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"the padding mask for {what} must have shape (batch, seq) = {tuple(x.shape[:2])}, "
                f"got {tuple(padding_mask.shape)}"
            )


def _accepts_branch_init(module: nn.Module) -> bool:
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        return False
    try:
        return len(inspect.signature(reset).parameters) >= 1
    except (TypeError, ValueError):
        return False


class TransformerBlock(BuiltFromSpec, nn.Module):
    """Common parts of encoder and decoder blocks: parts, placements, streams, initialization."""

    #: Sublayer names in forward order; each ``name`` has a placement ``name + "_residual"``.
    sublayer_names: tuple[str, ...] = ()

    def _assemble(self, cfg: BlockConfig | None, layer: LayerContext, built: dict, given: dict) -> None:
        """Register the parts (``given`` where passed, else ``built()``), check them, init the built ones."""
        if cfg is not None and not isinstance(cfg, BlockConfig):
            raise TypeError(f"expected a tformer.BlockConfig, got {type(cfg).__name__}")
        missing = [name for name in built if given.get(name) is None]
        if cfg is None and missing:
            raise ConfigError(
                f"{type(self).__name__} without a BlockConfig needs every part; missing: {', '.join(missing)} "
                f"(or pass cfg to build the missing ones)"
            )
        self.cfg, self.layer = cfg, layer
        self.built_parts = tuple(missing)
        for name in built:
            part = given.get(name)
            if part is None:
                part = built[name]()
            elif not isinstance(part, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(part).__name__}")
            setattr(self, name, part)
        for name in self.sublayer_names:
            placement = getattr(self, f"{name}_residual")
            if not isinstance(placement, ResidualPlacement):
                raise TypeError(f"{name}_residual must be a tformer.ResidualPlacement, got {type(placement).__name__}")
        streams = {getattr(self, f"{n}_residual").stream for n in self.sublayer_names}
        if len(streams) > 1:
            raise ConfigError(f"{type(self).__name__}: its placements carry different residual streams "
                              f"({', '.join(sorted(streams))}); use one kind of placement per block")
        self.d_model = cfg.d_model if cfg is not None else getattr(self.attn, "d_model", None)
        for name in self.sublayer_names:
            if name in self.built_parts:
                self._init_sublayer(name)

    def _placement(self) -> ResidualPlacement:
        return build_placement(self.cfg.placement, self.cfg.norm_factory(), self.layer, self.cfg.dropout)

    def residual_sublayers(self) -> dict[str, tuple[nn.Module, ResidualPlacement]]:
        """``{sublayer name: (sublayer module, its placement)}`` in forward order."""
        return {name: (getattr(self, name), getattr(self, f"{name}_residual")) for name in self.sublayer_names}

    @property
    def _first_residual(self) -> ResidualPlacement:
        return getattr(self, f"{self.sublayer_names[0]}_residual")

    @property
    def _last_residual(self) -> ResidualPlacement:
        return getattr(self, f"{self.sublayer_names[-1]}_residual")

    @property
    def needs_final_norm(self) -> bool:
        """Whether a stack ending with this block needs a closing norm (Pre-LN, sandwich, ...)."""
        return self._last_residual.needs_final_norm

    @property
    def supports_packing(self) -> bool:
        """Whether a stack may run this block on a packed batch (``tformer.packing``): its attention parts are
        tformer's ``MultiHeadAttention`` and its feed-forward works token by token (tformer's ``FeedForward``, or
        a part that declares ``tokenwise = True``)."""
        attention = [getattr(self, name) for name in self.sublayer_names if name != "ffn"]
        return (all(isinstance(part, MultiHeadAttention) for part in attention)
                and (isinstance(self.ffn, FeedForward) or getattr(self.ffn, "tokenwise", False) is True))

    @property
    def stream(self) -> str:
        """The kind of residual stream the placements carry (``"tensor"`` for one-tensor placements)."""
        return self._first_residual.stream

    def _init_sublayer(self, name: str) -> None:
        sublayer, placement = self.residual_sublayers()[name]
        if _accepts_branch_init(sublayer):
            sublayer.reset_parameters(placement.branch_init)

    def reset_parameters(self) -> None:
        """Initialize every sublayer that takes a ``BranchInit`` with its placement's (DeepNorm's beta, ...)."""
        for name in self.sublayer_names:
            self._init_sublayer(name)

    def begin(self, x: Tensor):
        """The residual stream a stack of these blocks starts from (``x`` itself for one-tensor placements)."""
        return self._first_residual.begin(x)

    def end(self, stream, final_norm: nn.Module | None, padding_mask: Tensor | None = None) -> Tensor:
        """A stack's output from the stream after this (its last) block."""
        return self._last_residual.end(stream, final_norm, padding_mask)

    def _enter(self, x, padding_mask: Tensor | None):
        """``(stream, standalone)``: a tensor starts the placements' stream here, a stream object continues."""
        check_inputs(stream_tensor(x), padding_mask, self.d_model)
        standalone = isinstance(x, Tensor)
        return (self.begin(x) if standalone else x), standalone

    def _exit(self, stream, standalone: bool, padding_mask: Tensor | None):
        return self.end(stream, None, padding_mask) if standalone else stream


@dataclass(frozen=True)
class EncoderBlockSpec(Spec):
    cfg: BlockConfig
    layer: LayerContext | None = None
    rope: bool = False


class EncoderBlock(TransformerBlock):
    """Self-attention then feed-forward, each wrapped by ``cfg.placement`` with ``cfg.norm``.

    ``forward(x, padding_mask=None)``: ``x`` (batch, seq, d_model), ``padding_mask`` (batch, seq)
    bool, True at padding; returns (batch, seq, d_model). ``layer`` places the block in a stack
    (depth-aware placements read it); on its own it is layer 0 of a one-layer encoder. ``rope``:
    rotary positions (at ``cfg.rope_base``) in self-attention. Any of
    ``attn``, ``ffn``, ``attn_residual``, ``ffn_residual`` passed in replaces the part ``cfg``
    would build (see the module docstring for their call signatures).
    """

    sublayer_names = ("attn", "ffn")

    def __init__(
        self,
        cfg: BlockConfig | None = None,
        *,
        attn: nn.Module | None = None,
        ffn: nn.Module | None = None,
        attn_residual: ResidualPlacement | None = None,
        ffn_residual: ResidualPlacement | None = None,
        layer: LayerContext | None = None,
        rope: bool = False,
    ):
        super().__init__()
        layer = layer or LayerContext("encoder")
        given = dict(attn=attn, attn_residual=attn_residual, ffn=ffn, ffn_residual=ffn_residual)
        self._assemble(cfg, layer, {
            "attn": lambda: MultiHeadAttention.from_config(cfg, rope=rope),
            "attn_residual": self._placement,
            "ffn": lambda: FeedForward.from_config(cfg),
            "ffn_residual": self._placement,
        }, given)
        self.spec = EncoderBlockSpec(cfg, layer, rope) if not any(v is not None for v in given.values()) else None


    def forward(self, x, *, padding_mask: Tensor | None = None, packing: Packing | None = None, **unexpected):
        reject_arguments(unexpected, "EncoderBlock.forward", ("x", "padding_mask", "packing"))
        stream, standalone = self._enter(x, padding_mask)
        attn = partial(self.attn, padding_mask=padding_mask) if packing is None else partial(self.attn, packing=packing)
        stream = self.attn_residual(stream, attn, padding_mask)
        stream = self.ffn_residual(stream, self.ffn, padding_mask)
        return self._exit(stream, standalone, padding_mask)


@dataclass(frozen=True)
class DecoderBlockSpec(Spec):
    cfg: BlockConfig
    cross_attention: bool = True
    causal: bool = True
    layer: LayerContext | None = None
    rope: bool = False


class DecoderBlock(TransformerBlock):
    """Self-attention (causal unless ``causal=False``), optional cross-attention to ``memory``, feed-forward.

    ``forward(x, padding_mask=None, memory=None, memory_padding_mask=None, cache=None)``: ``x``
    (batch, seq, d_model); ``memory`` (batch, mem_seq, d_model) is required with
    ``cross_attention=True``; ``cache`` (a ``LayerKV``) makes self-attention incremental.
    ``rope``: rotary positions in self-attention. ``attn``, ``cross_attn``, ``ffn`` and their
    ``*_residual`` placements may be passed in.
    """

    def __init__(
        self,
        cfg: BlockConfig | None = None,
        cross_attention: bool = True,
        *,
        causal: bool = True,
        attn: nn.Module | None = None,
        cross_attn: nn.Module | None = None,
        ffn: nn.Module | None = None,
        attn_residual: ResidualPlacement | None = None,
        cross_attn_residual: ResidualPlacement | None = None,
        ffn_residual: ResidualPlacement | None = None,
        layer: LayerContext | None = None,
        rope: bool = False,
    ):
        super().__init__()
        for name, value in (("cross_attention", cross_attention), ("causal", causal)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} must be True or False")
        if not cross_attention and (cross_attn is not None or cross_attn_residual is not None):
            raise ConfigError("cross_attn / cross_attn_residual were passed to a DecoderBlock with cross_attention=False")
        if attn is not None and getattr(attn, "causal", causal) != causal:
            raise ConfigError(f"the attn passed in has causal={attn.causal} but the block was asked for causal={causal}")
        layer = layer or LayerContext("decoder")
        self.causal = causal
        self.sublayer_names = ("attn", "cross_attn", "ffn") if cross_attention else ("attn", "ffn")
        given = dict(attn=attn, attn_residual=attn_residual, ffn=ffn, ffn_residual=ffn_residual)
        built = {"attn": lambda: MultiHeadAttention.from_config(cfg, causal=causal, rope=rope),
                 "attn_residual": self._placement}
        if cross_attention:
            given.update(cross_attn=cross_attn, cross_attn_residual=cross_attn_residual)
            built.update(cross_attn=lambda: MultiHeadAttention.from_config(cfg, cross=True),
                         cross_attn_residual=self._placement)
        built.update(ffn=lambda: FeedForward.from_config(cfg), ffn_residual=self._placement)
        self._assemble(cfg, layer, built, given)
        custom = any(v is not None for v in given.values())
        self.spec = None if custom else DecoderBlockSpec(cfg, cross_attention, causal, layer, rope)


    @property
    def has_cross_attention(self) -> bool:
        return "cross_attn" in self.sublayer_names

    def forward(
        self,
        x,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerKV | None = None,
        packing: Packing | None = None,
        **unexpected,
    ):
        reject_arguments(unexpected, "DecoderBlock.forward",
                         ("x", "padding_mask", "memory", "memory_padding_mask", "cache", "packing"))
        stream, standalone = self._enter(x, padding_mask)
        self_attn = partial(self.attn, padding_mask=padding_mask) if packing is None else partial(self.attn, packing=packing)
        if cache is not None:
            self_attn = partial(self_attn, cache=cache)
        stream = self.attn_residual(stream, self_attn, padding_mask)
        if self.has_cross_attention:
            if memory is None:
                raise ValueError("this DecoderBlock has cross-attention and needs `memory`, got None")
            check_inputs(memory, memory_padding_mask, self.d_model, what="memory")
            batch = stream_tensor(stream).shape[0] if packing is None else packing.batch
            if memory.shape[0] != batch:
                raise ValueError(f"memory has batch size {memory.shape[0]} but x has {batch}")
            cross = partial(self.cross_attn, memory=memory, memory_padding_mask=memory_padding_mask)
            if packing is not None:
                cross = partial(cross, packing=packing)
            stream = self.cross_attn_residual(stream, cross, padding_mask)
        elif memory is not None:
            raise ValueError("this DecoderBlock was built with cross_attention=False; it takes no `memory`")
        stream = self.ffn_residual(stream, self.ffn, padding_mask)
        return self._exit(stream, standalone, padding_mask)
