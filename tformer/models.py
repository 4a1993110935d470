"""Models on top of the stacks: a decoder-only ``LanguageModel``, an encoder-only ``EncoderModel`` and a
seq2seq ``EncoderDecoder``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import KVCache
from .backends import soft_cap
from .config import BlockConfig, check_positive_int
from .embeddings import Embedding, check_token_ids, is_rotary
from .errors import ConfigError
from .init import INIT_SCHEMES
from .spec import BuiltFromSpec, Spec
from .stacks import Decoder, Encoder

@dataclass(frozen=True)
class LanguageModelSpec(Spec):
    cfg: BlockConfig
    n_layers: int
    vocab_size: int
    max_seq_len: int
    positions: str = "learned"
    tie_embeddings: bool = True
    placements: tuple | None = None
    head_bias: bool = False
    logit_softcap: float | None = None


class LanguageModel(BuiltFromSpec, nn.Module):
    """Decoder-only language model: embedding, ``n_layers`` causal ``DecoderBlock`` layers, LM head.

    ``forward(tokens, padding_mask=None) -> logits``: tokens ``(batch, seq)`` long, logits
    ``(batch, seq, vocab_size)``; position ``i`` never sees tokens after ``i``.
    ``tie_embeddings`` shares the token embedding with the output projection.
    ``placements`` sets one placement per layer (e.g. for Mix-LN style studies).
    ``logit_softcap``: final logit soft-capping ``c * tanh(logits / c)`` (Gemma 2 uses 30).
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
        head_bias: bool = False,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float))
                                          or not 0 < logit_softcap < float("inf")):
            raise ConfigError(f"logit_softcap={logit_softcap!r} must be None or a finite number > 0")
        self.cfg = cfg
        self.spec = LanguageModelSpec(cfg, n_layers, vocab_size, max_seq_len, positions, tie_embeddings, placements,
                                      head_bias, logit_softcap)
        self.logit_softcap = logit_softcap
        self.embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        self.decoder = Decoder(cfg, n_layers, cross_attention=False, placements=placements, rope=is_rotary(positions))
        self.head = _make_head(cfg, vocab_size, self.embedding, tie_embeddings, head_bias)
        #: ``generate``'s defaults for ending rows (not part of the spec; ``tformer.from_hf`` sets them).
        self.eos_token_id: int | list[int] | None = None
        self.pad_token_id: int | None = None


    def forward(self, tokens: Tensor, *, padding_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``tokens`` (batch, seq) -> logits (batch, seq, vocab). With a ``cache`` (from
        ``new_cache``) the tokens continue the cached positions and their keys/values are added.

        ``tokens`` must be long or int32 ids in ``[0, vocab_size)``: another dtype is a ``TypeError``, an id out
        of range a ``ValueError`` naming the smallest and largest id (checked by one ``aminmax`` on the CPU; on
        CUDA only with ``tformer.set_debug_checks(True)``, to spare a host synchronization per forward; see
        ``tformer.embeddings.check_token_ids``). An empty batch or sequence gives empty logits."""
        offset = 0 if cache is None else cache.length
        x = self.decoder(self.embedding(tokens, offset), padding_mask=padding_mask, cache=cache)
        return soft_cap(self.head(x), self.logit_softcap)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty key/value cache for incremental decoding. ``capacity``: the positions it preallocates at the
        first step (None: as many as the first step brings); it grows geometrically past them."""
        return KVCache(len(self.decoder.layers), capacity)

    def _last_logits(self, tokens: Tensor, cache: KVCache | None) -> Tensor:
        """The logits ``(batch, vocab)`` after the last of ``tokens``: ``self(tokens, cache=cache)[:, -1]`` with
        the head applied to the last position only; ``generate`` checked the ids (prompt and pad id) already."""
        offset = 0 if cache is None else cache.length
        x = self.decoder(self.embedding(tokens, offset, what=None), cache=cache)
        return soft_cap(self.head(x[:, -1]), self.logit_softcap)

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
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (batch, seq); returns (batch, seq + max_new_tokens).

        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k most likely tokens. With
        ``use_cache`` each step feeds only the newest token through a KV cache preallocated for
        prompt + new tokens, which gives the same logits as recomputing the whole prefix. Runs in
        eval mode and restores the mode after.

        ``eos_token_id`` (one id or several; default ``self.eos_token_id``, None: never end) ends a row
        at its first end-of-sequence token: its later positions hold ``pad_token_id`` (default
        ``self.pad_token_id``, else the first eos id), and generation stops early once every row has
        ended, so the result can be shorter: Hugging Face ``generate``'s semantics.

        ``prompt`` is checked as ``forward``'s tokens (and must hold at least one position); ``pad_token_id``,
        fed back in for ended rows, must be an id of the vocabulary.
        """
        check_token_ids(prompt, self.embedding.vocab_size, "prompt")
        if prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, seq) token ids with seq >= 1, got shape {tuple(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or math.isnan(temperature):
            raise ValueError(f"temperature={temperature!r} must be a number >= 0")
        batch, length = prompt.shape
        total = length + max_new_tokens
        if total > self.embedding.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.embedding.max_seq_len}"
                             f"{self.embedding.max_seq_len_reason}")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if temperature != 0 and top_k is not None:
            check_positive_int("top_k", top_k)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        eos = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        pad = pad if pad is not None or eos is None else int(eos[0])
        vocab = self.embedding.vocab_size
        # the pad id is fed back only after a row ends, which needs an eos id the head can produce
        reachable = eos is not None and any(0 <= int(e) < vocab for e in eos)
        eos = None if eos is None else torch.tensor(eos, device=prompt.device)
        if reachable and not (isinstance(pad, numbers.Integral) and 0 <= pad < vocab):
            raise ValueError(f"pad_token_id={pad!r} (what an ended row is filled with, and fed back in) must be an "
                             f"id in [0, vocab_size={self.embedding.vocab_size})")
        was_training = self.training
        self.eval()
        tokens = prompt.new_empty(batch, total)  # filled in place: no concatenation per step
        tokens[:, :length] = prompt
        ended = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        cache = self.new_cache(total) if use_cache else None
        step_input = prompt
        try:
            for _ in range(max_new_tokens):
                logits = self._last_logits(step_input if use_cache else tokens[:, :length], cache)
                if temperature == 0:
                    next_token = logits.argmax(-1)
                else:
                    next_token = _sample(logits, temperature, top_k, generator)
                if eos is not None:
                    next_token = next_token.masked_fill(ended, pad)
                    ended |= torch.isin(next_token, eos)
                tokens[:, length] = next_token
                length += 1
                step_input = tokens[:, length - 1 : length]
                if eos is not None and ended.all():
                    break
        finally:
            self.train(was_training)
        return tokens if length == total else tokens[:, :length].contiguous()


@dataclass(frozen=True)
class EncoderModelSpec(Spec):
    cfg: BlockConfig
    n_layers: int
    vocab_size: int
    max_seq_len: int
    positions: str = "learned"
    n_token_types: int = 0
    embed_norm: bool = False
    placements: tuple | None = None
    final_norm: bool | None = None


class EncoderModel(BuiltFromSpec, nn.Module):
    """Encoder-only model (BERT-shaped): embeddings, ``n_layers`` ``EncoderBlock`` layers, no head.

    ``forward(tokens, padding_mask=None, token_type_ids=None) -> hidden`` with tokens ``(batch, seq)``
    and the last hidden state ``(batch, seq, d_model)``. ``n_token_types`` adds a segment embedding
    (BERT: 2); ``embed_norm`` normalizes the embeddings with the config's norm (BERT's embedding
    LayerNorm). ``final_norm`` as for ``Encoder``.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        n_layers: int,
        vocab_size: int,
        max_seq_len: int,
        *,
        positions: str = "learned",
        n_token_types: int = 0,
        embed_norm: bool = False,
        placements: Sequence[str] | None = None,
        final_norm: bool | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.spec = EncoderModelSpec(cfg, n_layers, vocab_size, max_seq_len, positions, n_token_types, embed_norm,
                                     placements, final_norm)
        self.embedding = Embedding(cfg, vocab_size, max_seq_len, positions, n_token_types=n_token_types,
                                   norm=embed_norm)
        self.encoder = Encoder(cfg, n_layers, placements=placements, final_norm=final_norm, rope=is_rotary(positions))


    def forward(self, tokens: Tensor, *, padding_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """``tokens`` (batch, seq) -> last hidden state (batch, seq, d_model)."""
        x = self.embedding(tokens, token_type_ids=token_type_ids, padding_mask=padding_mask)
        return self.encoder(x, padding_mask=padding_mask)


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
    head_bias: bool = False


class EncoderDecoder(BuiltFromSpec, nn.Module):
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
        head_bias: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.spec = EncoderDecoderSpec(
            cfg, n_encoder_layers, n_decoder_layers, vocab_size, max_seq_len, positions, tie_embeddings,
            encoder_placements,
            decoder_placements, head_bias,
        )
        check_positive_int("n_encoder_layers", n_encoder_layers)
        check_positive_int("n_decoder_layers", n_decoder_layers)
        self.src_embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        self.tgt_embedding = Embedding(cfg, vocab_size, max_seq_len, positions)
        if tie_embeddings:
            self.tgt_embedding.tokens.weight = self.src_embedding.tokens.weight
        rope = is_rotary(positions)
        self.encoder = Encoder(cfg, n_encoder_layers, placements=encoder_placements, n_decoder_layers=n_decoder_layers,
                               rope=rope)
        self.decoder = Decoder(
            cfg, n_decoder_layers, cross_attention=True, placements=decoder_placements, n_encoder_layers=n_encoder_layers,
            rope=rope,
        )
        self.head = _make_head(cfg, vocab_size, self.tgt_embedding, tie_embeddings, head_bias)


    def encode(self, src_tokens: Tensor, *, src_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, src_seq)`` -> memory ``(batch, src_seq, d_model)``."""
        return self.encoder(self.src_embedding(src_tokens, what="src_tokens"), padding_mask=src_padding_mask)

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
            self.tgt_embedding(tgt_tokens, what="tgt_tokens"),
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
        for name, tokens in (("src_tokens", src_tokens), ("tgt_tokens", tgt_tokens)):
            if not isinstance(tokens, Tensor) or tokens.dim() != 2:
                check_token_ids(tokens, self.src_embedding.vocab_size, name)  # raises the type or shape error
        if src_tokens.shape[0] != tgt_tokens.shape[0]:
            raise ValueError(f"src_tokens and tgt_tokens must have the same batch size, got src_tokens of shape "
                             f"{tuple(src_tokens.shape)} and tgt_tokens of shape {tuple(tgt_tokens.shape)}")
        memory = self.encode(src_tokens, src_padding_mask=src_padding_mask)
        return self.decode(tgt_tokens, memory, src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_padding_mask)


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` (batch, vocab): greedy at temperature 0, else sampled."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    if top_k is not None:
        check_positive_int("top_k", top_k)
    return _sample(logits, temperature, top_k, generator)


def _make_head(cfg: BlockConfig, vocab_size: int, embedding: Embedding, tie: bool, bias: bool = False) -> nn.Linear:
    """The LM head: ``d_model -> vocab_size``, sharing the token embedding when ``tie``; ``bias`` adds a
    (zero-initialized) bias, e.g. where a converted model folded its final norm's bias into the head."""
    if not isinstance(bias, bool):
        raise ConfigError(f"head_bias={bias!r} must be True or False")
    head = nn.Linear(cfg.d_model, vocab_size, bias=bias)
    if bias:
        nn.init.zeros_(head.bias)
    if tie:
        head.weight = embedding.tokens.weight
    else:
        INIT_SCHEMES[cfg.init].linear_(head.weight)
    return head


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """``sample_next`` for ``temperature > 0`` without re-checking its arguments (``generate``'s decode loop)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
