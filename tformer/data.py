"""Training data that needs no download: an embedded English corpus and synthetic seq2seq tasks.

* ``load_corpus()``: the Python reference manual's topics as shipped with CPython (PSF license),
  466 KB of English prose with code samples, stored in the package and pinned by SHA-256 so
  every run sees the same bytes. ``load_corpus(path)`` reads a user's own UTF-8 text file.
* ``ByteTokenizer``: UTF-8 bytes as tokens (vocabulary 256); decoding never fails.
* ``LMBatches``: random windows of a token stream, a pure function of ``(seed, step)``, so a
  resumed run sees exactly the batches it would have seen, and each of ``world_size`` processes
  takes its own slice of the same global batch.
* ``Seq2SeqTask``: copy, reverse and sort tasks generated deterministically from a seed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .registry import Registry

BUILTIN_CORPUS = "python_docs"
BUILTIN_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """The built-in corpus (``path`` None or ``"python_docs"``), or the UTF-8 text file at ``path``."""
    if path is None or str(path) == BUILTIN_CORPUS:
        raw = gzip.decompress(resources.files("tformer.corpus").joinpath("python_docs.txt.gz").read_bytes())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != BUILTIN_SHA256:
            raise RuntimeError(f"the built-in corpus has sha256 {digest}, expected {BUILTIN_SHA256}: damaged install?")
        return raw.decode("utf-8")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path={str(path)!r}: no such file (give a UTF-8 text file, or {BUILTIN_CORPUS!r})")
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text) < 1000:
        raise ConfigError(f"data.path={str(path)!r}: only {len(text)} characters; a corpus needs at least 1000")
    return text


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    name = "byte"

    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, tokens) -> str:
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, tokens: Tensor) -> int:
        """How many bytes of text ``tokens`` stand for (bits per byte divide by it)."""
        return tokens.numel()


def split_tokens(tokens: Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """The first ``1 - val_fraction`` of the stream for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def corpus_splits(path: str | os.PathLike | None = None, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """The corpus at ``path`` (default: built-in) as byte tokens, split into (train, validation)."""
    return split_tokens(ByteTokenizer().encode(load_corpus(path)), val_fraction)


def unigram_entropy(tokens: Tensor) -> float:
    """Entropy (nats/token) of ``tokens``' frequencies: the loss of a model that ignores context."""
    counts = torch.bincount(torch.as_tensor(tokens).flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class LMBatches:
    """Random ``seq_len + 1`` windows of ``tokens``: batch ``step`` depends only on ``(seed, step)``.

    ``tokens`` is a tensor or a (memory-mapped) numpy array, from which only the sampled windows are read.

    ``batch(step)`` returns ``(inputs, targets)``, each ``(batch_size // world_size, seq_len)``:
    this process's slice (``rank``) of the global batch.
    """

    tokens: Tensor
    batch_size: int
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if len(self.tokens) < self.seq_len + 2:
            raise ConfigError(f"the training text ({len(self.tokens)} tokens) is shorter than seq_len={self.seq_len}")
        if self.batch_size % self.world_size:
            raise ConfigError(f"batch_size={self.batch_size} must divide evenly over {self.world_size} processes")

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=_generator(self.seed, step))
        per_rank = self.batch_size // self.world_size
        starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        if isinstance(self.tokens, Tensor):
            windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        else:  # a memory-mapped token file: read just these windows
            windows = torch.from_numpy(np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
                                       .astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int) -> tuple[Tensor, Tensor]:
    """Consecutive non-overlapping windows from the start of ``tokens``: a fixed validation set."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise ConfigError(f"the validation text ({len(tokens)} tokens) is shorter than seq_len={seq_len}")
    windows = tokens[: n * seq_len + 1]
    inputs = windows[:-1].reshape(n, seq_len)
    targets = windows[1:].reshape(n, seq_len)
    return inputs, targets


SEQ2SEQ_TASKS: Registry[callable] = Registry("seq2seq task", field="data.task")
SEQ2SEQ_TASKS.register("copy")(lambda symbols: symbols)
SEQ2SEQ_TASKS.register("reverse")(lambda symbols: symbols.flip(0))
SEQ2SEQ_TASKS.register("sort")(lambda symbols: symbols.sort().values)


@dataclass
class Seq2SeqTask:
    """Synthetic sequence-to-sequence data: random symbol strings and their copy/reverse/sort.

    Token ids: ``PAD=0``, ``BOS=1``, ``EOS=2``, symbols ``3 .. vocab_size - 1``. ``batch(step)``
    returns ``(src, tgt_in, tgt_out, src_pad, tgt_pad)`` with ``src = symbols + EOS``,
    ``tgt_in = BOS + answer``, ``tgt_out = answer + EOS``; padding masks True at padding. Like
    ``LMBatches`` a batch depends only on ``(seed, step)`` and ``rank`` selects this process's slice.
    """

    task: str
    vocab_size: int = 16
    min_len: int = 4
    max_len: int = 12
    batch_size: int = 32
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    PAD, BOS, EOS = 0, 1, 2

    def __post_init__(self):
        self.transform = SEQ2SEQ_TASKS.get_or_raise(self.task)
        if self.vocab_size < 4:
            raise ConfigError(f"data.vocab_size={self.vocab_size} must be at least 4 (3 special tokens + symbols)")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"need 1 <= data.min_len={self.min_len} <= data.max_len={self.max_len}")
        if self.batch_size % self.world_size:
            raise ConfigError(f"batch_size={self.batch_size} must divide evenly over {self.world_size} processes")

    @property
    def max_seq_len(self) -> int:
        return self.max_len + 1

    def examples(self, n: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=generator)
        out = []
        for length in lengths.tolist():
            symbols = torch.randint(3, self.vocab_size, (length,), generator=generator)
            out.append((symbols, self.transform(symbols)))
        return out

    def collate(self, pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        n, width = len(pairs), self.max_len + 1
        src = torch.full((n, width), self.PAD)
        tgt_in = torch.full((n, width), self.PAD)
        tgt_out = torch.full((n, width), self.PAD)
        for i, (symbols, answer) in enumerate(pairs):
            length = len(symbols)
            src[i, :length], src[i, length] = symbols, self.EOS
            tgt_in[i, 0], tgt_in[i, 1 : length + 1] = self.BOS, answer
            tgt_out[i, :length], tgt_out[i, length] = answer, self.EOS
        return src, tgt_in, tgt_out, src == self.PAD, tgt_out == self.PAD

    def batch(self, step: int) -> tuple[Tensor, ...]:
        pairs = self.examples(self.batch_size, _generator(self.seed, step))
        per_rank = self.batch_size // self.world_size
        return self.collate(pairs[self.rank * per_rank : (self.rank + 1) * per_rank])

    def validation(self, n: int) -> tuple[Tensor, ...]:
        """A fixed validation set, drawn from a stream no training step uses."""
        return self.collate(self.examples(n, _generator(self.seed + 7919, -1)))
