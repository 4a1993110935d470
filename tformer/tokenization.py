"""Tokenizers for the LM recipes: bytes (the default) or a byte-level BPE trained on the training text.

* ``ByteTokenizer``: UTF-8 bytes as ids 0..255 (``tformer.data``).
* ``BPETokenizer``: byte-level BPE (GPT-2's scheme: every byte is in the base alphabet, so any text
  encodes and decoding never fails) trained with Hugging Face's ``tokenizers`` library, saved as
  ``tokenizer.json`` beside a run or a prepared token file, and read back by ``tformer generate``.
* ``token_bytes(tokens)``: how many bytes of text the tokens stand for, the denominator of bits
  per byte, which compares runs with different tokenizers fairly.
* ``tokenizer_for(directory)``: the tokenizer a run or prepared-data directory was made with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import ByteTokenizer
from .errors import ConfigError

TOKENIZERS = ("byte", "bpe")
TOKENIZER_FILE = "tokenizer.json"


def check_tokenizer(name: str, vocab_size=None) -> None:
    if name not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer={name!r}; valid choices: {', '.join(map(repr, TOKENIZERS))}")
    if name == "bpe" and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not
                          257 <= vocab_size <= 2**32 - 1):
        raise ConfigError(f"data.vocab_size={vocab_size!r} must be an integer of at least 257 for data.tokenizer=bpe "
                          f"(256 byte ids plus merges)")


class BPETokenizer:
    """Byte-level BPE over ``tokenizers.Tokenizer``; ids ``0 .. vocab_size - 1``."""

    name = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        # ByteLevel maps each byte to one character, so a token's length in characters is its length in bytes
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in tokenizer.get_vocab().items():
            lengths[index] = len(token)
        self._bytes = torch.from_numpy(lengths)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> BPETokenizer:
        """Train on ``texts`` (any iterable of strings, streamed) up to ``vocab_size`` ids."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])
        tokenizer.train_from_iterator(texts, trainer, length=length)  # callers pass lines (see encode_ids)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises its own Exception type for unreadable files
            raise ConfigError(f"{path}: not a readable tokenizer.json ({error})") from None

    def save(self, path: str | os.PathLike) -> None:
        from .checkpoint import atomic_write

        atomic_write(Path(path), lambda p: self.tokenizer.save(str(p)))

    def encode(self, text: str) -> Tensor:
        return torch.tensor(self.encode_ids(text), dtype=torch.long)

    def encode_ids(self, text: str) -> list[int]:
        """The ids of ``text``, encoded line by line (in parallel): every path (training the tokenizer,
        ``tformer prepare``, in-memory corpora, prompts) splits text the same way, so the same text gets the
        same ids whichever way it came."""
        ids: list[int] = []
        for encoding in self.tokenizer.encode_batch(_lines(text)):
            ids.extend(encoding.ids)
        return ids

    def decode(self, tokens) -> str:
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return self.tokenizer.decode([int(t) for t in tokens])

    def token_bytes(self, tokens: Tensor) -> int:
        return int(self._bytes[tokens.reshape(-1).long().cpu()].sum())


def tokenizer_for(directory: str | os.PathLike):
    """The tokenizer a run (or prepared data) directory holds: its ``tokenizer.json``, else bytes."""
    path = Path(directory) / TOKENIZER_FILE
    return BPETokenizer.load(path) if path.is_file() else ByteTokenizer()


# ------------------------------------------------------------------------------------------ prepared token files

TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_prepared(path: str | os.PathLike) -> tuple[np.memmap, dict]:
    """The memory-mapped token file of a ``tformer prepare`` directory and its description."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        tokens = np.memmap(path / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r")
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"data.path={str(path)!r}: not a readable prepared token directory ({error}); "
                          f"make one with `tformer prepare data.path=TEXT out={path}`") from None
    if len(tokens) != meta.get("n_tokens"):
        raise ConfigError(f"data.path={str(path)!r}: {TOKENS_FILE} holds {len(tokens)} tokens, {META_FILE} says "
                          f"{meta.get('n_tokens')}: the preparation did not finish; run it again")
    return tokens, meta


def text_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or the ``*.txt`` files under a folder (recursively, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if files:
            return files
        raise ConfigError(f"data.path={str(path)!r}: the folder holds no *.txt files")
    raise ConfigError(f"data.path={str(path)!r}: no such file or folder")


def read_chunks(files: list[Path], chunk_bytes: int = 1 << 22) -> Iterator[bytes]:
    """The files' bytes in chunks of about ``chunk_bytes``, each ending at a line break where there is one
    (so a multi-byte character or a word is never cut in two)."""
    for file in files:
        carry = b""
        with open(file, "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                block = carry + block
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # no line break in the whole block: cut before its last (maybe incomplete) character
                    cut = len(block) - 1
                    while cut > 0 and (block[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte
                        cut -= 1
                    cut = cut or len(block)
                carry = block[cut:]
                if cut:
                    yield block[:cut]
        if carry:
            yield carry


def prepare(source: str | os.PathLike, out: str | os.PathLike, tokenizer: str = "byte", vocab_size: int = 4096, *,
            progress: bool = True) -> dict:
    """Tokenize a text file (or the ``*.txt`` files of a folder) into ``out/tokens.bin`` (uint16, or uint32 for
    vocabularies over 65536) plus ``out/meta.json`` (and ``out/tokenizer.json`` for BPE), streaming: memory stays
    bounded by the chunk size whatever the input's size. ``meta.json`` is written last, so a directory without
    it is an unfinished preparation."""
    from tqdm.auto import tqdm

    from .checkpoint import atomic_write

    check_tokenizer(tokenizer, vocab_size)
    files = text_files(source)
    total = sum(f.stat().st_size for f in files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    bar_options = dict(total=total, unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True)
    if tokenizer == "bpe":
        with tqdm(desc="train BPE", **bar_options) as bar:
            def texts():
                for chunk in read_chunks(files):
                    bar.update(len(chunk))
                    yield from _lines(chunk.decode("utf-8", errors="replace"))

            encoder = BPETokenizer.train(texts(), vocab_size)
        encoder.save(out / TOKENIZER_FILE)
        vocab = encoder.vocab_size
    else:
        (out / TOKENIZER_FILE).unlink(missing_ok=True)
        encoder, vocab = None, 256
    dtype = token_dtype(vocab)
    n_tokens = 0

    def write_tokens(path: str) -> None:  # streamed into the temporary file atomic_write renames into place
        nonlocal n_tokens
        with open(path, "wb") as f, tqdm(desc="tokenize", **bar_options) as bar:
            for chunk in read_chunks(files):
                if encoder is None:
                    ids = np.frombuffer(chunk, dtype=np.uint8).astype(dtype)
                else:
                    ids = np.asarray(encoder.encode_ids(chunk.decode("utf-8", errors="replace")), dtype=dtype)
                f.write(ids.tobytes())
                n_tokens += len(ids)
                bar.update(len(chunk))

    atomic_write(out / TOKENS_FILE, write_tokens)
    meta = {"tokenizer": tokenizer, "vocab_size": vocab, "dtype": dtype.name, "n_tokens": n_tokens, "bytes": total,
            "files": [str(f) for f in files]}
    atomic_write(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return meta


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def lm_token_splits(data: dict, run_dir: Path | None, write: bool):
    """``(tokenizer, train tokens, validation tokens)`` for an LM recipe's ``data`` section.

    ``data.path`` is a text file (or the built-in corpus), tokenized in memory, or a ``tformer prepare``
    directory, memory-mapped (its training part is never loaded: windows are read as they are sampled). The
    validation part is the last ``val_fraction`` of the tokens. With ``data.tokenizer=bpe`` on a text, the BPE
    is trained on the training part of the text, or read from the run's ``tokenizer.json`` when resuming;
    the run directory gets a copy of the tokenizer either way (``write``: this process writes it).
    """
    from .data import load_corpus, split_tokens

    name, fraction = data["tokenizer"], data["val_fraction"]
    check_tokenizer(name, data.get("vocab_size"))
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction={fraction!r} must be in (0, 1)")
    saved = None if run_dir is None else run_dir / TOKENIZER_FILE
    if Path(str(data["path"])).is_dir() and not is_prepared(data["path"]):
        raise ConfigError(f"data.path={data['path']!r} is a folder without {META_FILE}: not a finished `tformer prepare` "
                          f"output; run `tformer prepare data.path=TEXT out={data['path']}` (again)")
    if is_prepared(data["path"]):
        tokens, meta = read_prepared(data["path"])
        if meta["tokenizer"] != name:
            raise ConfigError(f"data.path={data['path']!r} was prepared with tokenizer {meta['tokenizer']!r}, but "
                              f"data.tokenizer={name!r}; set data.tokenizer={meta['tokenizer']}")
        tokenizer = tokenizer_for(data["path"])
        cut = int(len(tokens) * (1.0 - fraction))
        needed = data["eval_windows"] * data["seq_len"] + 1  # the validation windows read no further
        train, val = tokens[:cut], torch.from_numpy(np.asarray(tokens[cut : cut + needed], dtype=np.int64))
    elif name == "byte":
        tokenizer = ByteTokenizer()
        train, val = split_tokens(tokenizer.encode(load_corpus(data["path"])), fraction)
    else:
        text = load_corpus(data["path"])
        cut = int(len(text) * (1.0 - fraction))
        if saved is not None and saved.is_file():
            tokenizer = BPETokenizer.load(saved)
        else:
            tokenizer = BPETokenizer.train(_lines(text[:cut]), data["vocab_size"])
        ids = tokenizer.encode(text)
        train, val = split_tokens(ids, fraction)
    if write and saved is not None and isinstance(tokenizer, BPETokenizer):
        saved.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
    return tokenizer, train, val
