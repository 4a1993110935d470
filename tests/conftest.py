"""Shared test helpers: the registered axes, CUDA skipping, and a CPU reference for xformers' kernel.

Tests parametrize over the registries (``tformer.NORMS``, ``tformer.PLACEMENTS``, ``tformer.BACKENDS``,
...) and read what an entry is from its declared traits, never from its name, so registering one
class puts it through every test. The helpers here derive everything from the registries.
"""

from __future__ import annotations

import functools
import inspect
import signal

import pytest
import torch

import tformer
from tformer.backends import resolve_backend
from tformer.norms import norm_traits

NORMS = list(tformer.NORMS)
PLACEMENTS = list(tformer.PLACEMENTS)
GRID = [(n, p) for n in NORMS for p in PLACEMENTS]


def _dispatches_elsewhere(name: str) -> bool:
    """A backend such as ``auto`` that picks another registered backend for the tensors it gets."""
    return resolve_backend(name, torch.zeros(1, 1, 1, 1)) != name


#: The backends that compute attention themselves: every registered one but dispatchers like ``auto``
#: (tested separately as "resolves to one of these"). ``xformers`` runs on the CPU with its kernel
#: swapped for the reference below (the ``xformers_reference`` fixture).
CPU_BACKENDS = [name for name in tformer.BACKENDS if not _dispatches_elsewhere(name)]
DISPATCHING_BACKENDS = [name for name in tformer.BACKENDS if _dispatches_elsewhere(name)]


def quick_norm_options(norm: str, warmup_iters: int = 2) -> dict:
    """``norm_options`` that end a norm's statistics warmup within a test's few calls, if it has one.

    Read from the norm's constructor, so a new norm with a ``warmup_iters`` option gets it too. A norm
    given as a class or callable rather than a registered name takes no ``norm_options``.
    """
    if not isinstance(norm, str):
        return {}
    params = inspect.signature(tformer.NORMS[norm]).parameters
    return {"warmup_iters": warmup_iters} if "warmup_iters" in params else {}


def causal_in_training(norm) -> bool:
    """Whether a causal decoder using ``norm`` stays causal in training mode (no batch statistics)."""
    return not norm_traits(norm).uses_batch_statistics


@functools.cache
def stack_depth(placement: str) -> int:
    """The depth for stack tests of ``placement``: 2 layers (so a stack-level placement's stream goes from
    block to block), or, for a depth-aware placement that picks different per-layer placements (Mix-LN),
    the fewest layers (up to 8) at which its layers differ."""
    cfg = tformer.BlockConfig(d_model=4, n_heads=1, d_ff=4, placement=placement)
    for n in range(2, 9):
        if len({type(block.ffn_residual) for block in tformer.Encoder(cfg, n).layers}) > 1:
            return n
    return 2


def spread(combinations, values):
    """Every combination with every one of ``values``: ``pytest.param(*combination, value)``.

    In the default run each combination takes one value: the one new to the most of its axis entries (a
    grid's rows and columns), ties broken by a rotation, so every entry of every axis meets as many values as
    it has combinations; the rest of the full product is marked ``slow`` (``.ci/run`` runs it).
    ``test_matrix`` checks the coverage of the default run.
    """
    params = []
    n = len(values)
    met: dict[tuple[int, object], set[int]] = {}  # (axis, entry) -> indices of the values it already meets
    for i, combination in enumerate(combinations):
        combination = combination if isinstance(combination, tuple) else (combination,)
        keys = list(enumerate(combination))
        rotation = (i + i // n) % n

        def novelty(j: int) -> tuple[int, int]:  # values new to the most axis entries; ties: the rotation's order
            return sum(j not in met.setdefault(k, set()) for k in keys), -((j - rotation) % n)

        fast = max(range(n), key=novelty)
        for k in keys:
            met[k].add(fast)
        for j, value in enumerate(values):
            params.append(pytest.param(*combination, value, marks=() if j == fast else (pytest.mark.slow,)))
    return params


def covering_pairs(first, second):
    """Pairs ``(a, b)`` that include every entry of ``first`` and of ``second`` at least once (the longer
    list in order, the shorter one cycled): one fast test per entry of two axes."""
    n = max(len(first), len(second))
    return [(first[i % len(first)], second[i % len(second)]) for i in range(n)]


def _split(combinations, chosen, chosen_marks: tuple, other_marks: tuple) -> list:
    """``combinations`` as pytest params: those in ``chosen`` with ``chosen_marks``, the rest with ``other_marks``."""
    chosen = set(chosen)
    return [pytest.param(*c, marks=chosen_marks if c in chosen else other_marks) for c in combinations]


def exhaustive_except(combinations, covering):
    """``combinations`` as pytest params: those in ``covering`` marked ``slow`` (``.ci/run`` runs them), the rest
    ``exhaustive`` (``python -m pytest -m exhaustive``; neither the default run nor CI), for products whose
    every combination costs too much for CI's budget but whose every entry must still be met there."""
    return _split(combinations, covering, (pytest.mark.slow,), (pytest.mark.exhaustive,))


def slow_except(combinations, fast):
    """``combinations`` as pytest params, all but those in ``fast`` marked ``slow``."""
    return _split(combinations, fast, (), (pytest.mark.slow,))


def default_signals() -> None:
    """``preexec_fn`` of a child the tests signal: SIGINT and SIGTERM back to their default before exec. A shell
    without job control starts background jobs with SIGINT ignored (so CI or nohup may hand pytest that), and
    tformer, like Python, leaves an ignored signal ignored: the child would not see the signals a test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def perturb_(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its symmetric init (ReZero's 0, norms' 1 and 0, hyper-connections' 0
    dynamic weights) so that every path of a block carries signal and gradient."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


#: Attention variants the matrix rotates over: BlockConfig fields, and whether blocks get rotary positions.
ATTENTION_VARIANTS = {
    "mha": ({}, False),
    "gqa": ({"n_kv_heads": 1}, False),
    "rope-qknorm-head": ({"qk_norm": "head"}, True),
    "rope-gqa-qknorm-full": ({"n_kv_heads": 1, "qk_norm": "full"}, True),
    "rope-wide-heads-scaled": ({"head_dim": 6, "attn_scale": 0.3, "n_kv_heads": 1, "qk_norm": "full"}, True),
}


def padded_pair(d_model: int, seed: int = 1):
    """``(x, pad, memory, memory_pad)``: float64 (3, 6, d) and (3, 5, d) inputs whose padding differs per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, d_model, generator=g, dtype=torch.float64)
    memory = torch.randn(3, 5, d_model, generator=g, dtype=torch.float64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = pad[2, 2:] = True
    memory_pad = torch.zeros(3, 5, dtype=torch.bool)
    memory_pad[0, 3:] = memory_pad[2, 1:] = True
    return x, pad, memory, memory_pad


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
