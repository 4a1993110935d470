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

Inputs are validated where they enter: a block called on its own checks its ``x``, ``padding_mask`` and
``memory``; a stack checks them once at its entry and calls its blocks with ``_checked=True``, so nothing is
checked again per layer. The checks are O(1) Python on shapes and dtypes (``check_inputs``, ``check_memory``,
``check_dtype``) and raise ``TypeError`` / ``ValueError`` naming the argument, what it was and what is valid,
before torch would fail deep inside ("mixed dtype", a size mismatch). Opt-in debug checks
(``set_debug_checks``) add a NaN/inf check of the inputs and, in ``"blocks"`` mode, of every block's output.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
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
    """Raise a clear error for a wrongly shaped input or a padding mask that is not (batch, seq) bool.

    O(1) Python on shapes and dtypes (no reduction over the data): ``x`` must be a floating-point
    ``(batch, seq, d_model)`` tensor, ``padding_mask`` None or a ``(batch, seq)`` bool tensor.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor of shape (batch, seq, d_model), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor (batch, seq, d_model), got dtype {x.dtype}: "
                        f"call {what}.to(dtype) with the module's dtype (e.g. torch.float32) on the input")
    if x.dim() != 3 or (d_model is not None and x.shape[-1] != d_model):
        raise ValueError(f"{what} must have shape (batch, seq, {d_model or 'd_model'}), got {tuple(x.shape)}")
    if padding_mask is not None:
        argument = "padding_mask" if what == "x" else f"{what}_padding_mask"
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
            raise TypeError(f"the padding mask for {what} must be a bool tensor (True = padding), got {got}: pass "
                            f"{argument} as a (batch, seq) bool tensor (e.g. attention_mask == 0)")
        if tuple(padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"the padding mask for {what} must have shape (batch, seq) = {tuple(x.shape[:2])}, "
                f"got {tuple(padding_mask.shape)} ({argument})"
            )


def check_memory(memory, memory_padding_mask: Tensor | None, x_shape: tuple, d_model: int | None) -> None:
    """Raise a clear error unless ``memory`` is a floating-point ``(batch, mem_seq, d_model)`` tensor with the
    batch size of the target ``x`` (of shape ``x_shape``) and ``memory_padding_mask`` fits it (O(1))."""
    if not isinstance(memory, Tensor):
        raise TypeError(f"memory must be a tensor of shape (batch, mem_seq, d_model), got {type(memory).__name__}")
    width = x_shape[-1] if d_model is None else d_model
    if memory.dim() != 3 or memory.shape[0] != x_shape[0] or memory.shape[-1] != width:
        raise ValueError(
            f"memory must have shape (batch, mem_seq, d_model) = ({x_shape[0]}, mem_seq, {width}) to match the "
            f"target x of shape {tuple(x_shape)}, got memory of shape {tuple(memory.shape)}"
        )
    check_inputs(memory, memory_padding_mask, width, what="memory")


def check_dtype(x: Tensor, reference: Tensor | None, what: str, where: str) -> None:
    """Raise ``TypeError`` when ``x`` (a floating-point input) and ``reference`` (a weight of the module
    ``where`` that reads it) differ in dtype, which torch would report as a "mixed dtype" error deep inside.

    O(1). Not an error under ``torch.autocast`` on ``x``'s device (autocast casts per op) nor when the
    weight is an FSDP2 shard (a ``DTensor``: FSDP's hooks gather it and cast the inputs in each block).
    """
    if reference is None or x.dtype == reference.dtype:
        return
    if torch.is_autocast_enabled(x.device.type) or _is_dtensor(reference):
        return
    raise TypeError(
        f"{what} has dtype {x.dtype} but the {where} it is passed to has {reference.dtype} weights: call "
        f"{what}.to({reference.dtype}) on the input, or .to({x.dtype}) on the module (or run under torch.autocast)"
    )


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


# ---------------------------------------------------------------------------------------------- debug checks

_DEBUG_MODES = (False, "inputs", "blocks")


def _resolve_debug_mode(mode) -> bool | str:
    resolved = "inputs" if mode is True else (False if mode is None else mode)
    if resolved not in _DEBUG_MODES:
        raise ConfigError(f"debug checks mode={mode!r}; valid choices: False (off), True or 'inputs', 'blocks'")
    return resolved


def _debug_mode_from_environment() -> bool | str:
    value = os.environ.get("TFORMER_DEBUG_CHECKS", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", "inputs"):
        return "inputs"
    if value == "blocks":
        return "blocks"
    warnings.warn(f"TFORMER_DEBUG_CHECKS={value!r} is not one of 0, 1, inputs, blocks: debug checks stay off",
                  stacklevel=2)
    return False


class _DebugChecks:
    """The process-wide debug-check mode (``set_debug_checks``); a plain attribute, read once per forward."""

    mode: bool | str = _debug_mode_from_environment()


def set_debug_checks(mode: bool | str = True) -> None:
    """Switch tformer's debug checks on or off for the whole process (as ``torch.autograd.set_detect_anomaly``).

    ``mode``:

    * ``False`` (the default, unless the environment variable ``TFORMER_DEBUG_CHECKS`` says otherwise):
      only the O(1) checks of shapes and dtypes, plus the token-id range check on the CPU;
    * ``True`` or ``"inputs"``: also refuse a non-finite (NaN or inf) input with a ``ValueError`` that
      names the argument and counts the bad values: the ``x`` (and ``memory``) a stack or a block is
      called with (for a model: its embeddings), once per call at the entry; and check token ids
      on every device (on CUDA that costs a host synchronization per forward);
    * ``"blocks"``: also each block's output inside a stack and the stack's output, so the error names
      the first layer whose output went non-finite.

    The finiteness check is one reduction over the input (a sum, confirmed exactly only when it is not
    finite); ``python benchmarks/finite_check.py`` measures its cost. Checks are skipped while
    ``torch.compile`` traces (they branch on data). ``TFORMER_DEBUG_CHECKS=1`` (or ``inputs``,
    ``blocks``) sets the mode at import, to debug a script without editing it; ``debug_checks`` sets
    it for a ``with`` block.
    """
    _DebugChecks.mode = _resolve_debug_mode(mode)


def get_debug_checks() -> bool | str:
    """The current debug-check mode: ``False``, ``"inputs"`` or ``"blocks"`` (see ``set_debug_checks``)."""
    return _DebugChecks.mode


@contextlib.contextmanager
def debug_checks(mode: bool | str = True):
    """``with tformer.debug_checks(): ...`` runs the block with ``set_debug_checks(mode)`` and restores the
    previous mode afterwards (process-wide, not per thread)."""
    previous = _DebugChecks.mode
    set_debug_checks(mode)
    try:
        yield
    finally:
        _DebugChecks.mode = previous


def debug_mode() -> bool | str:
    """The mode a forward runs its debug checks with: ``get_debug_checks()``, or False while compiling/tracing."""
    mode = _DebugChecks.mode
    if mode and (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return False
    return mode


def check_finite(x: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` holds NaN or inf (one sum; exact count only on failure)."""
    if x.numel() == 0:
        return
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    if bool(total.isfinite()):
        return
    bad = ~torch.isfinite(x)  # the sum can overflow on finite values: confirm exactly
    count = int(bad.sum())
    if count == 0:
        return
    nan, first = int(torch.isnan(x).sum()), tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{what} has non-finite values: {nan} NaN and {count - nan} inf among {x.numel()} elements of shape "
        f"{tuple(x.shape)}, the first at index {first} (tformer debug checks; tformer.set_debug_checks(False) "
        f"switches them off)"
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

    def reference_weight(self) -> Tensor | None:
        """The weight whose dtype an input must have: the self-attention's input projection (a custom
        attention part's first parameter; None if it has none). O(1) for tformer's attention."""
        attn = self.attn
        if isinstance(attn, MultiHeadAttention):
            return attn.q.weight if attn.cross else attn.qkv.weight
        return next(attn.parameters(), None)

    def check_input(self, x: Tensor, padding_mask: Tensor | None, memory: Tensor | None = None,
                    memory_padding_mask: Tensor | None = None, *, where: str | None = None,
                    x_shape: tuple | None = None, debug: bool | str = False) -> None:
        """The checks a block called alone, or a stack once at its entry (``where``: its class name), runs on
        its inputs: shapes, dtypes and masks, O(1); with ``debug`` (``debug_mode()``) also that ``x`` and
        ``memory`` are finite (one reduction each). ``x_shape``: the unpacked shape of a packed ``x``."""
        where = where or type(self).__name__
        check_inputs(x, padding_mask, self.d_model)
        weight = self.reference_weight()
        check_dtype(x, weight, "x", where)
        if memory is not None:
            check_memory(memory, memory_padding_mask, tuple(x.shape) if x_shape is None else x_shape, self.d_model)
            check_dtype(memory, weight, "memory", where)
        if debug:
            check_finite(x, f"x (the input of this {where})")
            if memory is not None:
                check_finite(memory, f"memory (the encoder output this {where} attends to)")

    def _enter(self, x, padding_mask: Tensor | None, memory: Tensor | None = None,
               memory_padding_mask: Tensor | None = None, packing: Packing | None = None, checked: bool = False):
        """``(stream, standalone)``: a tensor starts the placements' stream here, a stream object continues.
        ``checked``: a stack validated the inputs at its entry, so nothing is checked again per layer."""
        if not checked:
            hidden = stream_tensor(x)
            x_shape = None if packing is None else (packing.batch, packing.seq, self.d_model)
            self.check_input(hidden, padding_mask, memory, memory_padding_mask, x_shape=x_shape, debug=debug_mode())
        standalone = isinstance(x, Tensor)
        return (self.begin(x) if standalone else x), standalone

    def _exit(self, stream, standalone: bool, padding_mask: Tensor | None, checked: bool = False):
        out = self.end(stream, None, padding_mask) if standalone else stream
        if not checked and debug_mode() == "blocks":
            check_finite(stream_tensor(out), f"the output of this {type(self).__name__}")
        return out


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


    def forward(self, x, *, padding_mask: Tensor | None = None, packing: Packing | None = None,
                _checked: bool = False, **unexpected):
        reject_arguments(unexpected, "EncoderBlock.forward", ("x", "padding_mask", "packing"))
        stream, standalone = self._enter(x, padding_mask, packing=packing, checked=_checked)
        attn = partial(self.attn, padding_mask=padding_mask) if packing is None else partial(self.attn, packing=packing)
        stream = self.attn_residual(stream, attn, padding_mask)
        stream = self.ffn_residual(stream, self.ffn, padding_mask)
        return self._exit(stream, standalone, padding_mask, _checked)


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
        _checked: bool = False,
        **unexpected,
    ):
        reject_arguments(unexpected, "DecoderBlock.forward",
                         ("x", "padding_mask", "memory", "memory_padding_mask", "cache", "packing"))
        if self.has_cross_attention:
            if memory is None:
                raise ValueError("this DecoderBlock has cross-attention and needs `memory`, got None")
        elif memory is not None:
            raise ValueError("this DecoderBlock was built with cross_attention=False; it takes no `memory`")
        stream, standalone = self._enter(x, padding_mask, memory, memory_padding_mask, packing, _checked)
        self_attn = partial(self.attn, padding_mask=padding_mask) if packing is None else partial(self.attn, packing=packing)
        if cache is not None:
            self_attn = partial(self_attn, cache=cache)
        stream = self.attn_residual(stream, self_attn, padding_mask)
        if self.has_cross_attention:
            cross = partial(self.cross_attn, memory=memory, memory_padding_mask=memory_padding_mask)
            if packing is not None:
                cross = partial(cross, packing=packing)
            stream = self.cross_attn_residual(stream, cross, padding_mask)
        stream = self.ffn_residual(stream, self.ffn, padding_mask)
        return self._exit(stream, standalone, padding_mask, _checked)
