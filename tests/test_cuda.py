"""Tests that need a CUDA device: the real xformers kernel and auto-dispatch. Skipped without CUDA."""

import pytest
import torch

import tformer
from tformer import BACKENDS, BlockConfig
from tformer.backends import resolve_backend, xformers_unavailable_reason

pytestmark = pytest.mark.cuda

H, HD = 4, 32


def _qkv(dtype, batch=3, q_len=40, kv_len=40):
    shape_q, shape_kv = (batch, q_len, H, HD), (batch, kv_len, H, HD)
    return (torch.randn(shape_q, device="cuda", dtype=dtype),
            torch.randn(shape_kv, device="cuda", dtype=dtype),
            torch.randn(shape_kv, device="cuda", dtype=dtype))


def _needs_xformers():
    reason = xformers_unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_xformers_kernel_matches_math(dtype, atol, causal, padded):
    _needs_xformers()
    q, k, v = _qkv(dtype)
    pad = None
    if padded:
        pad = torch.zeros(3, 40, dtype=torch.bool, device="cuda")
        pad[1, 30:] = True
        pad[2, 5:] = True
    out = BACKENDS["xformers"](q, k, v, causal=causal, q_padding_mask=pad, kv_padding_mask=pad)
    ref = BACKENDS["math"](q.float(), k.float(), v.float(), causal=causal, q_padding_mask=pad, kv_padding_mask=pad)
    real = torch.ones(3, 40, dtype=torch.bool, device="cuda") if pad is None else ~pad
    torch.testing.assert_close(out.float()[real], ref[real], rtol=0, atol=atol)


def test_auto_prefers_xformers_on_cuda():
    _needs_xformers()
    q, _, _ = _qkv(torch.float16)
    assert resolve_backend("auto", q) == "xformers"


@pytest.mark.parametrize("placement", list(tformer.PLACEMENTS))
def test_block_on_cuda_matches_cpu(placement):
    cfg = BlockConfig(d_model=64, n_heads=4, d_ff=128, placement=placement, attention="auto")
    torch.manual_seed(0)
    block = tformer.DecoderBlock(cfg)
    x, memory = torch.randn(2, 12, 64), torch.randn(2, 7, 64)
    expected = block(x, memory=memory)
    got = block.cuda()(x.cuda(), memory=memory.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
