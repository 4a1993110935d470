"""Attention backends against a brute-force per-query computation; masks, NaN-safety, kernels."""

import pytest
import torch
from torch.profiler import profile

from conftest import CPU_BACKENDS, DISPATCHING_BACKENDS
from tformer import BACKENDS
from tformer.backends import attention_mask, resolve_backend, xformers_attention

H, HD = 2, 4


def brute_force(q, k, v, causal, q_pad, kv_pad):
    """Loop over batch, head, query: softmax over the keys the query may see. None where it sees none."""
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for i in range(q_len):
            keys = [j for j in range(kv_len)
                    if (kv_pad is None or not kv_pad[b, j]) and (not causal or j <= i + kv_len - q_len)]
            if not keys:
                continue
            for h in range(H):
                scores = torch.stack([q[b, i, h] @ k[b, j, h] for j in keys]) * HD**-0.5
                weights = torch.softmax(scores, 0)
                out[b, i, h] = sum(w * v[b, j, h] for w, j in zip(weights, keys))
    return out


def qkv(batch, q_len, kv_len):
    q = torch.randn(batch, q_len, H, HD, dtype=torch.float64)
    k = torch.randn(batch, kv_len, H, HD, dtype=torch.float64)
    v = torch.randn(batch, kv_len, H, HD, dtype=torch.float64)
    return q, k, v


def padding(batch, length, lengths):
    pad = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad[b, n:] = True
    return pad


CASES = {
    "plain": dict(q_len=5, kv_len=5, causal=False, pad=None, self_attn=True),
    "causal": dict(q_len=5, kv_len=5, causal=True, pad=None, self_attn=True),
    "padded": dict(q_len=5, kv_len=5, causal=False, pad=[5, 3, 1], self_attn=True),
    "causal_padded": dict(q_len=5, kv_len=5, causal=True, pad=[5, 2, 4], self_attn=True),
    "left_padded_causal": dict(q_len=5, kv_len=5, causal=True, pad="left", self_attn=True),
    "cross": dict(q_len=3, kv_len=6, causal=False, pad=None, self_attn=False),
    "cross_padded": dict(q_len=3, kv_len=6, causal=False, pad=[6, 2, 0], self_attn=False),
    "cached_causal": dict(q_len=2, kv_len=6, causal=True, pad=None, self_attn=False),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_brute_force(backend, case, xformers_reference):
    spec = CASES[case]
    q, k, v = qkv(3, spec["q_len"], spec["kv_len"])
    if spec["pad"] == "left":
        kv_pad = torch.zeros(3, 5, dtype=torch.bool)
        kv_pad[1, :2] = True
        kv_pad[2, :4] = True
    else:
        kv_pad = None if spec["pad"] is None else padding(3, spec["kv_len"], spec["pad"])
    q_pad = kv_pad if spec["self_attn"] else None
    out = BACKENDS[backend](q, k, v, causal=spec["causal"], q_padding_mask=q_pad, kv_padding_mask=kv_pad)
    expected = brute_force(q, k, v, spec["causal"], q_pad, kv_pad)
    assert torch.isfinite(out).all()
    real = torch.ones(3, spec["q_len"], dtype=torch.bool) if q_pad is None else ~q_pad
    torch.testing.assert_close(out[real], expected[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_padded_rows_are_finite_and_cross_rows_zero(backend, xformers_reference):
    q, k, v = qkv(2, 4, 4)
    pad = padding(2, 4, [4, 0])
    self_out = BACKENDS[backend](q, k, v, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
    assert torch.isfinite(self_out).all()
    cross_out = BACKENDS[backend](q, k, v, kv_padding_mask=pad)
    assert torch.isfinite(cross_out).all()
    assert cross_out[1].abs().sum() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend, xformers_reference):
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 4))
    pad = padding(2, 4, [4, 2])

    def fn(q, k, v):
        out = BACKENDS[backend](q, k, v, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
        return out[~pad]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_xformers_gradients_flow_through_packing(xformers_reference):
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 4))
    pad = padding(2, 4, [4, 2])
    out = BACKENDS["xformers"](q, k, v, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
    out.sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = BACKENDS["math"](q2, k2, v2, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
    ref[~pad].sum().backward()
    torch.testing.assert_close(q.grad[~pad], q2.grad[~pad])
    torch.testing.assert_close(k.grad, k2.grad)
    torch.testing.assert_close(v.grad, v2.grad)


def test_xformers_bias_types_and_packed_layout(xformers_reference):
    from xformers.ops.fmha import attn_bias as xbias

    q, k, v = qkv(3, 5, 5)
    BACKENDS["xformers"](q, k, v, causal=True)
    assert type(xformers_reference[-1]["bias"]) is xbias.LowerTriangularMask
    BACKENDS["xformers"](q[:, :2], k, v, causal=True)
    assert type(xformers_reference[-1]["bias"]) is xbias.LowerTriangularFromBottomRightMask
    BACKENDS["xformers"](q, k, v)
    assert xformers_reference[-1]["bias"] is None

    pad = padding(3, 5, [5, 3, 1])
    BACKENDS["xformers"](q, k, v, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
    call = xformers_reference[-1]
    assert type(call["bias"]) is xbias.BlockDiagonalCausalMask
    assert call["q_shape"] == (1, 9, H, HD) and call["k_shape"] == (1, 9, H, HD)  # 5 + 3 + 1 real tokens
    BACKENDS["xformers"](q[:, :2], k, v, kv_padding_mask=pad)
    call = xformers_reference[-1]
    assert type(call["bias"]) is xbias.BlockDiagonalMask
    assert call["q_shape"] == (1, 6, H, HD) and call["k_shape"] == (1, 9, H, HD)


def test_xformers_on_cpu_without_kernel_is_a_clear_error():
    assert xformers_attention.kernel is None
    q, k, v = qkv(1, 2, 2)
    with pytest.raises(RuntimeError, match=r"attention='xformers' cannot run.*CUDA.*'auto'"):
        BACKENDS["xformers"](q, k, v)


def test_auto_is_sdpa_on_cpu():
    q, k, v = qkv(2, 3, 3)
    assert resolve_backend("auto", q) == "sdpa"
    torch.testing.assert_close(BACKENDS["auto"](q, k, v, causal=True), BACKENDS["sdpa"](q, k, v, causal=True))


def test_every_backend_computes_or_dispatches():
    """The CPU tests run every registered backend: each computes attention itself (CPU_BACKENDS) or
    dispatches to one that does (DISPATCHING_BACKENDS, e.g. ``auto``)."""
    assert set(CPU_BACKENDS) | set(DISPATCHING_BACKENDS) == set(BACKENDS)
    assert {"math", "sdpa", "xformers"} <= set(CPU_BACKENDS) and "auto" in DISPATCHING_BACKENDS


@pytest.mark.parametrize("backend", DISPATCHING_BACKENDS)
def test_dispatching_backend_equals_the_backend_it_picks(backend):
    q, k, v = qkv(3, 5, 5)
    pad = padding(3, 5, [5, 3, 1])
    chosen = resolve_backend(backend, q)
    assert chosen in CPU_BACKENDS
    for kwargs in (dict(causal=True), dict(q_padding_mask=pad, kv_padding_mask=pad), dict(kv_padding_mask=pad)):
        torch.testing.assert_close(BACKENDS[backend](q, k, v, **kwargs), BACKENDS[chosen](q, k, v, **kwargs),
                                   rtol=0, atol=0)


def _kernels_run(fn):
    with profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("case", ["plain", "causal", "padded", "causal_padded", "cross_padded"])
def test_sdpa_keeps_the_cpu_flash_kernel_with_masks(case):
    """Padding masks must not push SDPA off its O(S)-memory flash kernel on CPU."""
    spec = CASES[case]
    q, k, v = (t.float() for t in qkv(3, spec["q_len"], spec["kv_len"]))
    kv_pad = None if spec["pad"] is None else padding(3, spec["kv_len"], spec["pad"])
    q_pad = kv_pad if spec["self_attn"] else None
    names = _kernels_run(lambda: BACKENDS["sdpa"](q, k, v, causal=spec["causal"], q_padding_mask=q_pad, kv_padding_mask=kv_pad))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names


def test_padding_mask_is_broadcast_not_per_query():
    pad = padding(2, 7, [7, 3])
    mask, is_causal = attention_mask(7, 7, causal=False, kv_padding_mask=pad, device=pad.device)
    assert mask.shape == (2, 1, 1, 7) and not is_causal
    assert attention_mask(7, 7, causal=True, kv_padding_mask=None, device=pad.device) == (None, True)


def test_causal_needs_enough_keys():
    q, k, v = qkv(1, 4, 2)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        BACKENDS["sdpa"](q, k, v, causal=True)
