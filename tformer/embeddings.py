"""Token embeddings and position encodings (the ``positions=`` registry).

Additive encodings (``learned``, ``sinusoidal``) are added to the token embeddings; rotary
positions (``rope``) add nothing here and rotate queries and keys inside self-attention instead
(``RotaryPositions.rotary = True``, read by the models, which then build their stacks with
``rope=True``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import debug_mode
from .config import BlockConfig, check_positive_int
from .init import INIT_SCHEMES
from .registry import Registry

POSITIONS: Registry[type[nn.Module]] = Registry("position encoding", field="positions")


@POSITIONS.register("learned")
class LearnedPositions(nn.Module):
    """A learned ``(max_seq_len, d_model)`` table of absolute positions."""

    rotary = False

    def __init__(self, max_seq_len: int, d_model: int, init: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        INIT_SCHEMES[init].embedding_(self.weight)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        return self.weight[offset : offset + seq_len]


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine positions (Vaswani et al. 2017), not a parameter and not saved."""

    rotary = False

    def __init__(self, max_seq_len: int, d_model: int, init: str):
        super().__init__()
        position = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_seq_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        return self.table[offset : offset + seq_len]


@POSITIONS.register("rope")
class RotaryPositions(nn.Module):
    """Rotary positions (Su et al. 2021): nothing is added to the embeddings; self-attention rotates
    queries and keys (``tformer.rotary``, Llama's half-split layout, base ``BlockConfig.rope_base``)."""

    rotary = True

    def __init__(self, max_seq_len: int, d_model: int, init: str):
        super().__init__()

    def forward(self, seq_len: int, offset: int = 0) -> None:
        return None


#: the dtypes ``nn.Embedding`` takes as ids
ID_DTYPES = (torch.long, torch.int32)


def check_token_ids(tokens, vocab_size: int, what: str = "tokens", *, size_name: str = "vocab_size") -> None:
    """Raise a clear error unless ``tokens`` is a ``(batch, seq)`` integer tensor of ids in ``[0, vocab_size)``.

    The type and shape checks are O(1). The range check is one ``aminmax`` reduction over the ids (cheap
    next to the embedding lookup) and runs on the CPU, where an id out of range would otherwise end in a raw
    ``IndexError``. On other devices it would cost a host synchronization per forward, so it runs there
    only with ``tformer.set_debug_checks(True)`` (CUDA's embedding kernel stops on a device-side assert
    instead); it is skipped for empty inputs and while ``torch.compile`` or ``torch.jit`` traces.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{what} must be a (batch, seq) tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in ID_DTYPES:
        raise TypeError(f"{what} must be integer token ids (torch.long or torch.int32), got dtype {tokens.dtype}: "
                        f"call {what}.long()")
    if tokens.dim() != 2:
        raise ValueError(f"{what} must be (batch, seq) token ids, got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0 or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if tokens.device.type != "cpu" and not debug_mode():
        return
    low, high = tokens.aminmax()
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} holds ids from {low} to {high}, outside [0, {size_name}={vocab_size}) of this "
                         f"model's embedding")


def is_rotary(positions: str) -> bool:
    """Whether the position encoding ``positions`` works inside attention rather than on the embeddings."""
    return bool(getattr(POSITIONS.get_or_raise(positions), "rotary", False))


class Embedding(nn.Module):
    """Token embedding times the init scheme's scale (sqrt(d_model) for Xavier), plus additive
    positions and token types where there are any, an optional norm (BERT's), then dropout.

    ``(batch, seq)`` token ids -> ``(batch, seq, d_model)``. ``n_token_types > 0`` adds a learned
    token-type (segment) embedding; ``norm=True`` normalizes the sum with the config's norm.
    """

    def __init__(self, cfg: BlockConfig, vocab_size: int, max_seq_len: int, positions: str, *,
                 n_token_types: int = 0, norm: bool = False):
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("max_seq_len", max_seq_len)
        scheme = INIT_SCHEMES[cfg.init]
        self.max_seq_len = max_seq_len
        #: why ``max_seq_len`` is what it is, added to the error for a longer input (``from_hf`` sets it for Gemma 2)
        self.max_seq_len_reason = ""
        self.tokens = nn.Embedding(vocab_size, cfg.d_model)
        scheme.embedding_(self.tokens.weight)
        self.scale = scheme.embed_scale(cfg.d_model)
        self.positions = POSITIONS.get_or_raise(positions)(max_seq_len, cfg.d_model, cfg.init)
        self.token_types = nn.Embedding(n_token_types, cfg.d_model) if n_token_types else None
        if self.token_types is not None:
            scheme.embedding_(self.token_types.weight)
        self.norm = cfg.norm_factory()() if norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def vocab_size(self) -> int:
        return self.tokens.num_embeddings

    def forward(self, tokens: Tensor, offset: int = 0, *, token_type_ids: Tensor | None = None,
                padding_mask: Tensor | None = None, what: str | None = "tokens") -> Tensor:
        """``tokens`` (batch, seq) ids -> ``(batch, seq, d_model)``; ``what`` names ``tokens`` in errors (see
        ``check_token_ids`` for which checks run where), or is None for ids the caller checked (``generate``'s
        steps: its prompt checked once, then ids it sampled itself)."""
        if what is not None:
            check_token_ids(tokens, self.tokens.num_embeddings, what)
        seq_len = tokens.shape[1]
        if offset + seq_len > self.max_seq_len:
            raise ValueError(f"sequence of length {offset + seq_len} exceeds max_seq_len={self.max_seq_len}"
                             f"{self.max_seq_len_reason}")
        x = self.tokens(tokens) * self.scale
        positions = self.positions(seq_len, offset)
        if positions is not None:
            x = x + positions
        if self.token_types is not None:
            if token_type_ids is None:
                types = torch.zeros_like(tokens)
            else:
                check_token_ids(token_type_ids, self.token_types.num_embeddings, "token_type_ids",
                                size_name="n_token_types")
                if token_type_ids.shape != tokens.shape:
                    raise ValueError(f"token_type_ids must have the shape of {what} {tuple(tokens.shape)}, got "
                                     f"{tuple(token_type_ids.shape)}")
                types = token_type_ids
            x = x + self.token_types(types)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token-type embedding (n_token_types=0)")
        if self.norm is not None:
            x = self.norm(x, padding_mask)
        return self.dropout(x)
