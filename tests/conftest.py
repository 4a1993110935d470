"""Shared test helpers: CUDA skipping and a CPU reference for xformers' kernel."""

from __future__ import annotations

import pytest
import torch

CPU_BACKENDS = ["math", "sdpa", "xformers"]  # xformers with its kernel swapped for the reference below


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def reference_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' documented semantics, computed densely on any device.

    Layout ``(batch, seq, heads, head_dim)``; ``softmax(q k^T * scale + bias) v`` where ``bias``
    is an ``AttentionBias`` materialized over ``(batch, heads, q_len, kv_len)`` or a tensor.
    """
    from xformers.ops.fmha.attn_bias import AttentionBias

    batch, q_len, heads, head_dim = query.shape
    kv_len = key.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    scores = torch.einsum("bqhk,bmhk->bhqm", query, key) * scale
    if isinstance(attn_bias, AttentionBias):
        scores = scores + attn_bias.materialize((batch, heads, q_len, kv_len), dtype=scores.dtype, device=scores.device)
    elif attn_bias is not None:
        scores = scores + attn_bias
    probs = torch.softmax(scores, dim=-1)
    if p > 0:
        probs = torch.nn.functional.dropout(probs, p)
    return torch.einsum("bhqm,bmhk->bqhk", probs, value)


@pytest.fixture
def xformers_reference(monkeypatch):
    """Route tformer's xformers backend through the reference kernel; records each call's bias."""
    from tformer.backends import xformers_attention

    calls = []

    def kernel(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.append({"bias": attn_bias, "q_shape": tuple(q.shape), "k_shape": tuple(k.shape)})
        return reference_memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=p, scale=scale)

    monkeypatch.setattr(xformers_attention, "kernel", kernel)
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
