"""Large data without loading it: ``tformer prepare`` token files, memory-mapped training, the BPE tokenizer,
bits per byte."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tformer
from tformer import ConfigError
from tformer.cli import main
from tformer.data import load_corpus
from tformer.recipe_config import load_config
from tformer.tokenization import BPETokenizer, prepare, read_chunks, read_prepared, tokenizer_for
from tformer.training import recipe_defaults, train

TINY_LM = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "data.seq_len=32", "data.eval_windows=8", "train.warmup_steps=2", "log.every=1",
    "log.eval_every=3", "log.progress=false", "log.checkpoint_every=100", "train.batch_size=4",
]


def corpus_folder(tmp_path: Path) -> Path:
    text = load_corpus()
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(text[:150_000], encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(text[150_000:300_000] + "naïve café ünïcode\n", encoding="utf-8")
    (folder / "ignored.md").write_text("not a .txt file")
    return folder


def test_prepare_streams_bytes_into_a_token_file(tmp_path):
    folder = corpus_folder(tmp_path)
    assert main(["prepare", f"data.path={folder}", f"out={tmp_path / 'tok'}", "--quiet"]) == 0
    tokens, meta = read_prepared(tmp_path / "tok")
    expected = (folder / "a.txt").read_bytes() + (folder / "sub" / "b.txt").read_bytes()
    assert meta["tokenizer"] == "byte" and meta["dtype"] == "uint16" and meta["n_tokens"] == len(expected)
    assert meta["files"] == [str(folder / "a.txt"), str(folder / "sub" / "b.txt")]
    assert bytes(np.asarray(tokens, dtype=np.uint8)) == expected


def test_chunks_end_at_line_breaks_or_whole_characters(tmp_path):
    text = "é" * 5000 + "\n" + "x" * 10 + "€" * 3000  # long lines of multi-byte characters
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(read_chunks([path], chunk_bytes=1001))
    assert len(chunks) > 10
    assert "".join(c.decode("utf-8") for c in chunks) == text  # each chunk decodes on its own


def test_training_from_a_prepared_directory_equals_training_from_the_text(tmp_path):
    """The token file is memory-mapped and only sampled windows are read; batches and the validation split are
    those of the same text read into memory, so the two runs end with the same weights."""
    text = tmp_path / "corpus.txt"
    text.write_text(load_corpus()[:200_000], encoding="utf-8")
    prepare(text, tmp_path / "prepared", progress=False)
    for name, path in (("from_text", text), ("from_tokens", tmp_path / "prepared")):
        config = load_config(recipe_defaults("lm"), None, [*TINY_LM, f"data.path={path}", "train.steps=3",
                                                          f"out_dir={tmp_path}", f"run={name}"])
        train(config)
    a = tformer.load(tmp_path / "from_text" / "model.safetensors").state_dict()
    b = tformer.load(tmp_path / "from_tokens" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prepared_data_errors_are_clear(tmp_path):
    prepare(corpus_folder(tmp_path), tmp_path / "tok", progress=False)
    config = load_config(recipe_defaults("lm"), None, [*TINY_LM, f"data.path={tmp_path / 'tok'}",
                                                      "data.tokenizer=bpe", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="prepared with tokenizer 'byte', but data.tokenizer='bpe'"):
        train(config)
    (tmp_path / "tok" / "meta.json").unlink()  # as an interrupted preparation leaves it
    config = load_config(recipe_defaults("lm"), None, [*TINY_LM, f"data.path={tmp_path / 'tok'}", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="folder without meta.json: not a finished `tformer prepare`"):
        train(config)
    with pytest.raises(ConfigError, match="data.tokenizer='wordpiece'; valid choices: 'byte', 'bpe'"):
        prepare(tmp_path / "texts", tmp_path / "x", tokenizer="wordpiece", progress=False)
    with pytest.raises(ConfigError, match="no such file or folder"):
        prepare(tmp_path / "nope", tmp_path / "x", progress=False)

def test_prepare_command_errors(tmp_path, capsys):
    assert main(["prepare", f"data.path={tmp_path}", "data.seq_len=3"]) == 2
    assert "tformer prepare: error: unknown key 'data.seq_len'; valid keys: data.path, data.tokenizer" in \
        capsys.readouterr().err
    assert main(["prepare"]) == 2
    assert "data.path=FILE_OR_FOLDER is required" in capsys.readouterr().err


def test_bpe_round_trips_text_and_counts_its_bytes(tmp_path):
    text = load_corpus()[:100_000] + "naïve café 数学 🙂\n"
    tokenizer = BPETokenizer.train(text.splitlines(keepends=True), 400)
    assert tokenizer.vocab_size == 400
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_bytes(ids) == len(text.encode("utf-8"))
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges compress English prose
    tokenizer.save(tmp_path / "tokenizer.json")
    again = tokenizer_for(tmp_path)
    assert torch.equal(again.encode(text), ids)


def test_prepare_bpe_writes_the_tokenizer_and_its_ids(tmp_path):
    folder = corpus_folder(tmp_path)
    meta = prepare(folder, tmp_path / "bpe", tokenizer="bpe", vocab_size=500, progress=False)
    tokens, _ = read_prepared(tmp_path / "bpe")
    tokenizer = tokenizer_for(tmp_path / "bpe")
    assert meta["vocab_size"] == tokenizer.vocab_size == 500 and int(tokens.max()) < 500
    original = ((folder / "a.txt").read_text(encoding="utf-8") + (folder / "sub" / "b.txt").read_text(encoding="utf-8"))
    assert tokenizer.decode(torch.from_numpy(np.asarray(tokens, dtype=np.int64))) == original
    assert tokenizer.token_bytes(torch.from_numpy(np.asarray(tokens, dtype=np.int64))) == meta["bytes"]


def test_bpe_recipe_reports_bits_per_byte_resumes_and_generates(tmp_path, capsys):
    common = [*TINY_LM, "data.tokenizer=bpe", "data.vocab_size=320", "train.steps=4", "log.checkpoint_every=2",
              f"out_dir={tmp_path}"]
    result = train(load_config(recipe_defaults("lm"), None, common))
    run = tmp_path / "run"
    tokenizer = tokenizer_for(run)
    assert tokenizer.name == "bpe" and tokenizer.vocab_size == 320
    model = tformer.load(run / "model.safetensors")
    assert model.spec.vocab_size == 320
    # bits per byte: the summed nats over the validation targets over ln 2 x the bytes they stand for
    from tformer.training.tasks import LanguageModelTask
    from tformer.training.distributed import Dist

    task = LanguageModelTask(load_config(recipe_defaults("lm"), None, common), Dist(), torch.device("cpu"))
    inputs, targets = task.val
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(inputs).reshape(-1, 320), targets.reshape(-1), reduction="sum")
    byte_count = len(tokenizer.decode(targets.reshape(-1)).encode("utf-8"))
    assert result.final["bits_per_byte"] == pytest.approx(nats.item() / (math.log(2) * byte_count), rel=1e-5)
    assert result.final["bits_per_byte"] != pytest.approx(result.final["val_loss"] / math.log(2), rel=0.05)
    longer = train(load_config(recipe_defaults("lm"), None, [*common, "train.steps=6"]))  # resumes with its tokenizer
    assert longer.steps == 6
    assert main(["generate", str(run), "--prompt", "The ", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ")
    assert main(["inspect", str(run)]) == 0
    assert "tokenizer:       bpe (320 ids)" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_keeps_memory_bounded_on_a_large_file(tmp_path):
    """200 MB of text through `tformer prepare` in a fresh process: peak RSS far below the input's size."""
    big = tmp_path / "big.txt"
    block = load_corpus().encode("utf-8")
    with open(big, "wb") as f:
        while f.tell() < 200_000_000:
            f.write(block)
    size = big.stat().st_size
    # VmHWM, the peak RSS of this process image (getrusage's ru_maxrss would include the forking pytest's)
    script = ("import sys; from tformer.cli import main; rc = main(sys.argv[1:]); "
              "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]; "
              "print('peak', int(hwm) * 1024); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, "prepare", f"data.path={big}", f"out={tmp_path / 'tok'}",
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split("peak")[-1])
    assert peak < 600e6, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB input"
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["n_tokens"] == size
