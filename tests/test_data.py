import hashlib

import pytest
import torch

from tformer import ConfigError
from tformer.data import (BUILTIN_SHA256, ByteTokenizer, LMBatches, Seq2SeqTask, eval_windows, load_corpus,
                          split_tokens)


def test_builtin_corpus_is_pinned_english_text():
    text = load_corpus()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == BUILTIN_SHA256
    assert len(text) > 400_000
    assert "assert" in text[:200] and text.count(" the ") > 3000


def test_user_corpus(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("hello world. " * 100)
    assert load_corpus(path).startswith("hello world.")
    with pytest.raises(ConfigError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="at least 1000"):
        load_corpus(tmp_path / "short.txt")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — ok"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode([0xC3]) == "\ufffd"


def test_lm_batches_are_a_function_of_seed_and_step():
    tokens = torch.arange(1000)
    data = LMBatches(tokens, batch_size=4, seq_len=10, seed=3)
    x, y = data.batch(7)
    assert x.shape == (4, 10) and torch.equal(y, x + 1)
    assert torch.equal(LMBatches(tokens, 4, 10, seed=3).batch(7)[0], x)
    assert not torch.equal(data.batch(8)[0], x)
    halves = [LMBatches(tokens, 4, 10, seed=3, rank=r, world_size=2).batch(7)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)
    with pytest.raises(ConfigError, match="divide evenly"):
        LMBatches(tokens, 3, 10, world_size=2)


def test_split_and_eval_windows():
    train, val = split_tokens(torch.arange(100), 0.1)
    assert len(train) == 90 and val[0] == 90
    x, y = eval_windows(torch.arange(50), 8, 100)
    assert x.shape == (6, 8) and torch.equal(y, x + 1)
    with pytest.raises(ConfigError):
        split_tokens(torch.arange(10), 1.5)


@pytest.mark.parametrize("task, answer", [("copy", lambda s: s), ("reverse", lambda s: s.flip(0)),
                                          ("sort", lambda s: s.sort().values)])
def test_seq2seq_tasks(task, answer):
    data = Seq2SeqTask(task, vocab_size=10, min_len=3, max_len=6, batch_size=8, seed=1)
    src, tgt_in, tgt_out, src_pad, tgt_pad = data.batch(0)
    assert src.shape == tgt_in.shape == (8, 7)
    for i in range(8):
        n = int((~src_pad[i]).sum()) - 1
        symbols = src[i, :n]
        assert src[i, n] == data.EOS and (symbols >= 3).all()
        assert torch.equal(tgt_out[i, :n], answer(symbols)) and tgt_out[i, n] == data.EOS
        assert tgt_in[i, 0] == data.BOS and torch.equal(tgt_in[i, 1 : n + 1], answer(symbols))
        assert torch.equal(tgt_pad[i], tgt_out[i] == data.PAD)
    assert torch.equal(Seq2SeqTask(task, 10, 3, 6, 8, seed=1).batch(0)[0], src)
    with pytest.raises(ConfigError, match="data.task="):
        Seq2SeqTask("shuffle")
