"""Grouped-query attention and the two QK-norm conventions against independent computations."""

import pytest
import torch

import tformer
from tformer import BlockConfig, ConfigError
from tformer.attention import MultiHeadAttention


def _mha_twin(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """A full multi-head attention whose key/value heads are the GQA module's, each repeated for its group."""
    d, kv, hd = gqa.d_model, gqa.kv_size, gqa.head_dim
    groups = gqa.n_heads // gqa.n_kv_heads
    twin = MultiHeadAttention(d, gqa.n_heads, causal=gqa.causal, backend="math").double()
    w, b = gqa.qkv.weight, gqa.qkv.bias
    q_w, k_w, v_w = w.split([d, kv, kv])
    q_b, k_b, v_b = b.split([d, kv, kv])

    def repeat(t):
        return t.reshape(gqa.n_kv_heads, hd, *t.shape[1:]).repeat_interleave(groups, 0).reshape(d, *t.shape[1:])

    with torch.no_grad():
        twin.qkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        twin.qkv.bias.copy_(torch.cat([q_b, repeat(k_b), repeat(v_b)]))
        twin.out.load_state_dict(gqa.out.state_dict())
    return twin


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads(n_kv_heads, backend):
    torch.manual_seed(0)
    gqa = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads, causal=True, backend=backend).double()
    assert gqa.qkv.weight.shape == (16 + 2 * n_kv_heads * 4, 16)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    torch.testing.assert_close(gqa(x, padding_mask=pad), _mha_twin(gqa)(x, padding_mask=pad), rtol=0, atol=1e-10)


def test_gqa_cache_holds_only_the_key_value_heads():
    lm = tformer.LanguageModel(BlockConfig(d_model=16, n_heads=4, d_ff=32, n_kv_heads=1), 2, 11, 16)
    cache = lm.new_cache()
    lm(torch.randint(0, 11, (3, 6)), cache=cache)
    assert cache.layers[0].k.shape == (3, 6, 1, 4) and cache.layers[1].v.shape == (3, 6, 1, 4)


def _rms(t, eps=1e-5):
    return t / (t.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("mode", ["head", "full"])
def test_qk_norm_conventions(mode):
    """'head': RMS over each head's vector (Gemma 3, Qwen 3); 'full': over the whole projection (OLMo 2)."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, n_kv_heads=2, qk_norm=mode, backend="math").double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    q, k, _ = attn.qkv(x).split([16, 8, 8], -1)
    if mode == "full":
        q_ref, k_ref = _rms(q) * attn.q_norm.weight, _rms(k) * attn.k_norm.weight
        q_ref, k_ref = q_ref.reshape(2, 3, 4, 4), k_ref.reshape(2, 3, 2, 4)
    else:
        q_ref = _rms(q.reshape(2, 3, 4, 4)) * attn.q_norm.weight
        k_ref = _rms(k.reshape(2, 3, 2, 4)) * attn.k_norm.weight
    q_got, k_got, *_ = attn._project(x, None, None, None)
    torch.testing.assert_close(q_got, q_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(k_got, k_ref, rtol=0, atol=1e-12)


def test_qk_norm_comes_before_rotary_positions():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, qk_norm="full", rope_base=1e4, backend="math").double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    q, _, _ = attn.qkv(x).split([8, 8, 8], -1)
    expected = tformer.rotary.apply_rotary(attn.q_norm(q).reshape(1, 4, 2, 4), 0, 1e4)
    torch.testing.assert_close(attn._project(x, None, None, None)[0], expected, rtol=0, atol=1e-12)


def test_config_validation_and_true_means_per_head():
    assert BlockConfig(d_model=16, n_heads=4, qk_norm=True).qk_norm == "head"
    with pytest.raises(ConfigError, match=r"qk_norm='rows'.*'head'.*'full'"):
        BlockConfig(d_model=16, n_heads=4, qk_norm="rows")
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        BlockConfig(d_model=16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads=0"):
        BlockConfig(d_model=16, n_heads=4, n_kv_heads=0)


def test_wide_heads_and_scale_against_an_independent_computation():
    """head_dim independent of d_model / n_heads and a scale of one's own (Gemma 2): the projections are
    (n_heads * head_dim)-wide and the scores use the given scale, as written out here."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, head_dim=6, scale=0.3, backend="sdpa").double()
    assert attn.qkv.weight.shape == (3 * 12, 8) and attn.out.weight.shape == (8, 12)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = (t.reshape(2, 5, 2, 6).transpose(1, 2) for t in attn.qkv(x).split(12, -1))
    probs = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    expected = attn.out((probs @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)


def test_softcap_against_an_independent_computation():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, causal=True, softcap=0.5).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 3
    q, k, v = (t.reshape(2, 5, 2, 4).transpose(1, 2) for t in attn.qkv(x).split(8, -1))
    scores = 0.5 * torch.tanh(q @ k.transpose(-1, -2) * 4**-0.5 / 0.5)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(attn.attention_probs(x), scores.softmax(-1).float(), rtol=0, atol=1e-6)  # float32
    uncapped = MultiHeadAttention(8, 2, causal=True).double()
    uncapped.load_state_dict(attn.state_dict())
    assert (uncapped(x) - attn(x)).abs().max() > 1e-2  # the cap bites at this scale


@pytest.mark.parametrize("fields, match", [
    (dict(head_dim=0), "head_dim=0 must be a positive integer"),
    (dict(attn_scale=-1.0), "attn_scale=-1.0 must be None or a finite number > 0"),
    (dict(attn_softcap=float("inf")), "attn_softcap=inf must be None or a finite number > 0"),
    (dict(attn_softcap=30.0, attention="sdpa"), "attn_softcap=30.0 is computed by the 'math' attention backend only"),
    (dict(d_model=30, n_heads=4), "set head_dim"),
])
def test_attention_fields_are_validated(fields, match):
    with pytest.raises(ConfigError, match=match):
        BlockConfig(**{"d_model": 32, "n_heads": 4, **fields})


def test_head_dim_frees_d_model_from_divisibility():
    cfg = BlockConfig(d_model=30, n_heads=4, d_ff=8, head_dim=8)
    block = tformer.EncoderBlock(cfg)
    assert cfg.head_size == 8 and block.attn.qkv.weight.shape == (96, 30)
    assert block(torch.randn(2, 3, 30)).shape == (2, 3, 30)
    assert BlockConfig(d_model=32, n_heads=4).head_size == 8
