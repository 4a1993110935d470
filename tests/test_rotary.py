"""Rotary positions against an independent computation, and their place in attention and models."""

import math

import pytest
import torch

import tformer
from tformer import BlockConfig, LanguageModel
from tformer.attention import MultiHeadAttention
from tformer.rotary import apply_rotary


def rotate_by_hand(x, offset, base):
    """Each pair (x_i, x_{i + d/2}) of a head vector at position p turned by the angle p * base^(-2i/d)."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    for s in range(x.shape[1]):
        p = offset + s
        for i in range(d // 2):
            theta = p * base ** (-2 * i / d)
            c, sn = math.cos(theta), math.sin(theta)
            a, b = x[:, s, :, i], x[:, s, :, i + d // 2]
            out[:, s, :, i] = a * c - b * sn
            out[:, s, :, i + d // 2] = a * sn + b * c
    return out


@pytest.mark.parametrize("offset, base", [(0, 10000.0), (5, 10000.0), (3, 500000.0)])
def test_rotary_matches_the_rotation_of_each_pair(offset, base):
    x = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, offset, base), rotate_by_hand(x, offset, base), rtol=0, atol=1e-12)


def test_rotary_scores_depend_on_relative_position_only():
    """<R(p) q, R(t) k> = <R(p + s) q, R(t + s) k>: the property rotary positions exist for."""
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    score = (apply_rotary(q, 7, 1e4) * apply_rotary(k, 3, 1e4)).sum()
    shifted = (apply_rotary(q, 107, 1e4) * apply_rotary(k, 103, 1e4)).sum()
    torch.testing.assert_close(score, shifted, rtol=0, atol=1e-9)
    assert not torch.allclose(score, (apply_rotary(q, 7, 1e4) * apply_rotary(k, 5, 1e4)).sum())


def test_rotary_attention_equals_attention_on_rotated_queries_and_keys():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, causal=True, rope_base=1e4, backend="math").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, -1)
    q, k, v = (t.reshape(2, 5, 4, 4) for t in (q, k, v))
    q, k = rotate_by_hand(q, 0, 1e4), rotate_by_hand(k, 0, 1e4)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.out(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-10)


def test_rotary_model_tells_positions_apart_and_decodes_at_the_right_offsets():
    torch.manual_seed(0)
    lm = LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32), 2, 23, 32, positions="rope").double().eval()
    tokens = torch.randint(0, 23, (1, 10))
    swapped = tokens.clone()
    swapped[0, [2, 5]] = swapped[0, [5, 2]]
    assert not torch.allclose(lm(tokens)[0, -1], lm(swapped)[0, -1])  # order matters without additive positions
    assert isinstance(lm.embedding.positions, tformer.embeddings.RotaryPositions)
    assert all(block.attn.rope_base == 1e4 for block in lm.decoder.layers)
    cache = lm.new_cache()
    steps = [lm(tokens[:, :6], cache=cache)] + [lm(tokens[:, i : i + 1], cache=cache) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), lm(tokens), rtol=0, atol=1e-10)


def test_rope_base_and_head_dim_validation():
    with pytest.raises(tformer.ConfigError, match="rope_base"):
        BlockConfig(d_model=16, n_heads=2, rope_base=0.5)
    with pytest.raises(tformer.ConfigError, match="even head_dim"):
        LanguageModel(BlockConfig(d_model=15, n_heads=5, d_ff=8), 1, 7, 8, positions="rope")
    seq2seq = tformer.EncoderDecoder(BlockConfig(d_model=16, n_heads=2, d_ff=32, rope_base=100.0), 1, 1, 9,
                                     positions="rope")
    assert seq2seq.encoder.layers[0].attn.rope_base == 100.0 and seq2seq.decoder.layers[0].cross_attn.rope_base is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 37])
def test_rotate_equals_the_composite_formula_bit_for_bit_forward_and_backward(dtype, offset):
    """``rotate`` (two passes, inverse rotation as backward) against ``x * cos + rotate_half(x) * sin`` run by
    autograd, on the strided query view attention hands it (a slice of the fused qkv projection)."""
    torch.manual_seed(offset)
    qkv = torch.randn(3, 7, 3 * 4 * 16, dtype=dtype)
    q = qkv[..., : 4 * 16].view(3, 7, 4, 16)
    assert not q.is_contiguous()
    cos, sin = tformer.rotary.rotary_cos_sin(q, offset, 1e4)
    grad = torch.randn(3, 7, 4, 16, dtype=dtype)
    fused, composite = q.clone().requires_grad_(), q.clone().requires_grad_()
    out = tformer.rotary.rotate(fused, cos, sin)
    expected = tformer.rotary.rotate_composite(composite, cos, sin)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(fused.grad, composite.grad)
    with torch.no_grad():  # the route without autograd
        assert torch.equal(tformer.rotary.rotate(q, cos, sin), expected)


def test_rotate_gradcheck_and_its_backward_is_the_inverse_rotation():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = tformer.rotary.rotary_cos_sin(x, 3, 100.0)
    assert torch.autograd.gradcheck(lambda t: tformer.rotary.rotate(t, cos, sin), (x,))
    turned = tformer.rotary.rotate(x, cos, sin)
    (grad,) = torch.autograd.grad(turned, x, turned.detach())  # R^T (R x) = x: rotations are orthogonal
    torch.testing.assert_close(grad, x.detach(), rtol=0, atol=1e-12)


def test_rotate_falls_back_to_the_formula_when_cos_needs_a_gradient():
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    cos, sin = (t.clone().requires_grad_() for t in tformer.rotary.rotary_cos_sin(x, 0, 1e4))
    tformer.rotary.rotate(x, cos, sin).sum().backward()
    assert cos.grad is not None and sin.grad is not None
    torch.testing.assert_close(sin.grad, tformer.rotary.rotate_half(x).sum((0, 2))[:, None], rtol=0, atol=1e-12)
