"""The example model under checkpoints/ loads, evaluates well on held-out text and generates text."""

from pathlib import Path

import torch

import tformer
from tformer.data import ByteTokenizer, eval_windows, load_corpus, split_tokens

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "lm_python_docs" / "model.safetensors"


def test_readme_two_lines_load_and_generate():
    lm = tformer.load(SHIPPED)
    text = tformer.data.ByteTokenizer().decode(
        lm.generate(tformer.data.ByteTokenizer().encode("The ")[None], 200, top_k=40,
                    generator=torch.Generator().manual_seed(0))[0])
    assert text.startswith("The ") and len(text.encode()) >= 150
    letters = sum(c.isalpha() or c.isspace() for c in text)
    assert letters / len(text) > 0.75, text  # English-looking bytes, not noise
    assert len(set(text.split())) > 15, text


def test_shipped_model_predicts_held_out_text():
    lm = tformer.load(SHIPPED)
    _, val = split_tokens(ByteTokenizer().encode(load_corpus()), 0.1)
    inputs, targets = eval_windows(val, 256, 8)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(lm(inputs).reshape(-1, 256), targets.reshape(-1)).item()
    assert loss < 1.8  # nats/byte; a byte-frequency model gets 3.26, an untrained one 5.5


def test_small_enough_to_ship():
    assert SHIPPED.stat().st_size < 5_000_000
