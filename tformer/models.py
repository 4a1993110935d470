"""Models on top of the stacks: a decoder-only ``LanguageModel`` and a seq2seq ``EncoderDecoder``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import KVCache
from .config import BlockConfig, check_positive_int
from .init import INIT_SCHEMES
from .registry import Registry
from .spec import Spec
from .stacks import Decoder, Encoder

POSITIONS: Registry[type[nn.Module]] = Registry("position encoding", field="positions")


@POSITIONS.register("learned")
class LearnedPositions(nn.Module):
    """A learned ``(max_seq_len, d_model)`` table of absolute positions."""

    def __init__(self, max_seq_len: int, d_model: int, init: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        INIT_SCHEMES[init].embedding_(self.weight)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        return self.weight[offset : offset + seq_len]


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine positions (Vaswani et al. 2017), not a parameter and not saved."""

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


class Embedding(nn.Module):
    """Token embedding times the init scheme's scale (sqrt(d_model) for Xavier), plus positions, then dropout.

    ``(batch, seq)`` token ids -> ``(batch, seq, d_model)``.
    """

    def __init__(self, cfg: BlockConfig, vocab_size: int, max_seq_len: int, positions: str):
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("max_seq_len", max_seq_len)
        scheme = INIT_SCHEMES[cfg.init]
        self.max_seq_len = max_seq_len
        self.tokens = nn.Embedding(vocab_size, cfg.d_model)
        scheme.embedding_(self.tokens.weight)
        self.scale = scheme.embed_scale(cfg.d_model)
        self.positions = POSITIONS.get_or_raise(positions)(max_seq_len, cfg.d_model, cfg.init)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq) token ids, got shape {tuple(tokens.shape)}")
        seq_len = tokens.shape[1]
        if offset + seq_len > self.max_seq_len:
            raise ValueError(f"sequence of length {offset + seq_len} exceeds max_seq_len={self.max_seq_len}")
        x = self.tokens(tokens) * self.scale + self.positions(seq_len, offset)
        return self.dropout(x)


@dataclass(frozen=True)
class LanguageModelSpec(Spec):
    cfg: BlockConfig
    n_layers: int
    vocab_size: int
    max_seq_len: int
    positions: str = "learned"
    tie_embeddings: bool = True
    placements: tuple | None = None


class LanguageModel(nn.Module):
    """Decoder-only language model: embedding, ``n_layers`` causal ``DecoderBlock``s, LM head.

    ``forward(tokens, padding_mask=None) -> logits``: tokens ``(batch, seq)`` long, logits
    ``(batch, seq, vocab_size)``; position ``i`` never sees tokens after ``i``.
    ``tie_embeddings`` shares the token embedding with the output projection.
    ``placements`` sets one placement per layer (e.g. for Mix-LN style studies).
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        vocab_size: int,
        max_seq_len: int,
        *,
        positions: str = "learned",
        tie_embeddings: bool = True,
        placements: Sequence[str] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.spec = LanguageModelSpec(cfg, n_layers, vocab_size, max_seq_len, positions, tie_embeddings,
                                      None if placements is None else tuple(placements))
        self.embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        self.decoder = Decoder(cfg, n_layers, cross_attention=False, placements=placements)
        self.head = _make_head(cfg, vocab_size, self.embedding, tie_embeddings)

    @classmethod
    def from_spec(cls, spec: LanguageModelSpec) -> LanguageModel:
        return cls(**spec.kwargs())

    def forward(self, tokens: Tensor, *, padding_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``tokens`` (batch, seq) -> logits (batch, seq, vocab). With a ``cache`` (from
        ``new_cache``) the tokens continue the cached positions and their keys/values are added."""
        offset = 0 if cache is None else cache.length
        x = self.decoder(self.embedding(tokens, offset), padding_mask=padding_mask, cache=cache)
        return self.head(x)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding."""
        return KVCache(len(self.decoder.layers))

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (batch, seq); returns (batch, seq + max_new_tokens).

        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k most likely tokens. With
        ``use_cache`` each step feeds only the newest token through a KV cache, which gives the
        same logits as recomputing the whole prefix. Runs in eval mode and restores the mode after.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, seq) token ids with seq >= 1, got shape {tuple(prompt.shape)}")
        total = prompt.shape[1] + max_new_tokens
        if total > self.embedding.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.embedding.max_seq_len}")
        was_training = self.training
        self.eval()
        tokens, cache = prompt, (self.new_cache() if use_cache else None)
        step_input = prompt
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, cache=cache)[:, -1]
            next_token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
        self.train(was_training)
        return tokens


@dataclass(frozen=True)
class EncoderDecoderSpec(Spec):
    cfg: BlockConfig
    n_encoder_layers: int
    n_decoder_layers: int
    vocab_size: int
    max_seq_len: int = 1024
    positions: str = "learned"
    tie_embeddings: bool = True
    encoder_placements: tuple | None = None
    decoder_placements: tuple | None = None


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer over one shared vocabulary.

    ``forward(src_tokens, tgt_tokens, src_padding_mask=None, tgt_padding_mask=None) -> logits``
    of shape ``(batch, tgt_seq, vocab_size)``. The encoder and decoder know each other's depth,
    so DeepNorm picks the encoder-decoder constants. ``tie_embeddings`` shares one embedding
    between source, target and the output projection.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_encoder_layers: int,
        n_decoder_layers: int,
        vocab_size: int,
        *,
        max_seq_len: int = 1024,
        positions: str = "learned",
        tie_embeddings: bool = True,
        encoder_placements: Sequence[str] | None = None,
        decoder_placements: Sequence[str] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.spec = EncoderDecoderSpec(
            cfg, n_encoder_layers, n_decoder_layers, vocab_size, max_seq_len, positions, tie_embeddings,
            None if encoder_placements is None else tuple(encoder_placements),
            None if decoder_placements is None else tuple(decoder_placements),
        )
        check_positive_int("n_encoder_layers", n_encoder_layers)
        check_positive_int("n_decoder_layers", n_decoder_layers)
        self.src_embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        self.tgt_embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        if tie_embeddings:
            self.tgt_embedding.tokens.weight = self.src_embedding.tokens.weight
        self.encoder = Encoder(cfg, n_encoder_layers, placements=encoder_placements, n_decoder_layers=n_decoder_layers)
        self.decoder = Decoder(
            cfg, n_decoder_layers, cross_attention=True, placements=decoder_placements, n_encoder_layers=n_encoder_layers
        )
        self.head = _make_head(cfg, vocab_size, self.tgt_embedding, tie_embeddings)

    @classmethod
    def from_spec(cls, spec: EncoderDecoderSpec) -> EncoderDecoder:
        return cls(**spec.kwargs())

    def encode(self, src_tokens: Tensor, *, src_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, src_seq)`` -> memory ``(batch, src_seq, d_model)``."""
        return self.encoder(self.src_embedding(src_tokens), padding_mask=src_padding_mask)

    def decode(
        self,
        tgt_tokens: Tensor,
        memory: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Target tokens and encoder memory -> logits ``(batch, tgt_seq, vocab_size)``."""
        x = self.decoder(
            self.tgt_embedding(tgt_tokens),
            padding_mask=tgt_padding_mask,
            memory=memory,
            memory_padding_mask=src_padding_mask,
        )
        return self.head(x)

    def forward(
        self,
        src_tokens: Tensor,
        tgt_tokens: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> Tensor:
        memory = self.encode(src_tokens, src_padding_mask=src_padding_mask)
        return self.decode(tgt_tokens, memory, src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_padding_mask)


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` (batch, vocab): greedy at temperature 0, else sampled."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        check_positive_int("top_k", top_k)
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _make_head(cfg: BlockConfig, vocab_size: int, embedding: Embedding, tie: bool) -> nn.Linear:
    head = nn.Linear(cfg.d_model, vocab_size, bias=False)
    if tie:
        head.weight = embedding.tokens.weight
    else:
        INIT_SCHEMES[cfg.init].linear_(head.weight)
    return head

