import pytest
import torch

import tformer
from conftest import ATTENTION_VARIANTS, GRID, perturb_, quick_norm_options, spread, stack_depth
from tformer import BlockConfig, LanguageModel
from tformer.models import sample_next

V = 31


VARIANTS = [f"{positions}/{name}" for positions in tformer.POSITIONS for name in ATTENTION_VARIANTS]


@pytest.mark.parametrize("norm, placement, variant", spread(GRID, VARIANTS))
def test_incremental_decoding_equals_full_recomputation(norm, placement, variant):
    """KV-cache decoding equals recomputing the whole prefix, for every norm x placement (stack-level ones
    carry their stream through each step) with one position encoding x attention variant each (rotating:
    rotary positions, grouped-query attention whose cache holds only the KV heads, both QK-norms);
    x every one: slow."""
    positions, name = variant.split("/")
    fields = ATTENTION_VARIANTS[name][0]
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm=norm, placement=placement,
                      norm_options=quick_norm_options(norm), **{"qk_norm": True, **fields})
    torch.manual_seed(0)
    lm = perturb_(LanguageModel(cfg, stack_depth(placement), V, 24, positions=positions)).double().eval()
    tokens = torch.randint(0, V, (2, 12))
    full = lm(tokens)
    cache = lm.new_cache()
    pieces = [lm(tokens[:, :5], cache=cache)]  # a prompt, then one token at a time
    for t in range(5, 12):
        pieces.append(lm(tokens[:, t : t + 1], cache=cache))
    assert cache.length == 12
    assert cache.layers[0].k.shape[2] == cfg.kv_heads  # the cache stores only the key/value heads
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


def test_generate_with_and_without_cache_agree():
    lm = LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32), 2, V, 32)
    prompt = torch.randint(0, V, (3, 4))
    greedy = lm.generate(prompt, 10, temperature=0)
    assert greedy.shape == (3, 14) and torch.equal(greedy[:, :4], prompt)
    assert torch.equal(greedy, lm.generate(prompt, 10, temperature=0, use_cache=False))
    sampled = lm.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    again = lm.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(sampled, again)
    assert lm.training  # mode restored


def test_sampling_rules():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)


def test_generate_errors():
    lm = LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32), 1, V, 8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        lm.generate(torch.zeros(1, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="padding mask"):
        lm(torch.zeros(1, 2, dtype=torch.long), padding_mask=torch.zeros(1, 2, dtype=torch.bool), cache=lm.new_cache())
    assert isinstance(lm.new_cache(), tformer.attention.KVCache)


def test_soft_capped_model_decodes_with_the_cache_as_it_recomputes():
    """Gemma 2's soft-capped attention scores and final logits under the KV cache."""
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm="rmsnorm", placement="sandwich", n_kv_heads=1, head_dim=12,
                      attn_softcap=1.0, norm_options={"unit_offset": True})
    torch.manual_seed(0)
    lm = perturb_(LanguageModel(cfg, 2, V, 24, positions="rope", logit_softcap=2.0)).double().eval()
    tokens = torch.randint(0, V, (2, 10))
    full = lm(tokens)
    assert full.abs().max() < 2.0
    cache = lm.new_cache()
    pieces = [lm(tokens[:, :4], cache=cache)] + [lm(tokens[:, t : t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- the KV cache


def gqa_lm(n_layers=2, n_kv_heads=1, **kwargs):
    cfg = BlockConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64)
    torch.manual_seed(0)
    return LanguageModel(cfg, n_layers, V, 64, positions="rope", **kwargs).eval()


def test_cache_memory_equals_its_theoretical_size_and_stays_put_while_decoding():
    """A cache preallocated for prompt + new tokens holds 2 * layers * batch * capacity * kv_heads * head_dim
    elements (kv_heads, not heads) and never reallocates while decoding: the buffers keep their storage."""
    lm = gqa_lm(n_layers=3, n_kv_heads=1)
    batch, prompt_len, new = 2, 5, 9
    cache = lm.new_cache(prompt_len + new)
    assert cache.nbytes == 0 and cache.capacity == 0
    tokens = torch.randint(0, V, (batch, prompt_len + new))
    lm(tokens[:, :prompt_len], cache=cache)
    layer = cache.layers[0]
    assert layer.keys.shape == (batch, 1, prompt_len + new, 8)  # (batch, kv_heads, capacity, head_dim)
    storages = [(lay.keys.untyped_storage().data_ptr(), lay.values.untyped_storage().data_ptr())
                for lay in cache.layers]
    theoretical = 2 * 3 * batch * (prompt_len + new) * 1 * 8 * 4
    assert cache.nbytes == theoretical
    assert sum(lay.keys.untyped_storage().nbytes() + lay.values.untyped_storage().nbytes()
               for lay in cache.layers) == theoretical
    for t in range(prompt_len, prompt_len + new):
        lm(tokens[:, t : t + 1], cache=cache)
        assert cache.nbytes == theoretical
    assert cache.length == cache.capacity == prompt_len + new
    assert storages == [(lay.keys.untyped_storage().data_ptr(), lay.values.untyped_storage().data_ptr())
                        for lay in cache.layers]
    # the legacy (batch, length, kv_heads, head_dim) views read the buffers without copying
    assert layer.k.shape == (batch, prompt_len + new, 1, 8) and layer.k.data_ptr() == layer.keys.data_ptr()


def test_cache_grows_geometrically_past_its_capacity():
    lm = gqa_lm(n_kv_heads=2)
    tokens = torch.randint(0, V, (2, 40))
    full = lm(tokens)
    cache = lm.new_cache()  # no capacity: the first step's length, then doubling
    pieces = [lm(tokens[:, :3], cache=cache)]
    capacities = [cache.capacity]
    for t in range(3, 40):
        pieces.append(lm(tokens[:, t : t + 1], cache=cache))
        capacities.append(cache.capacity)
    assert sorted(set(capacities)) == [3, 6, 12, 24, 48]  # 4 reallocations for 37 appends
    assert cache.nbytes == 2 * 2 * 2 * 48 * 2 * 8 * 4
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    more = lm.new_cache(4)
    lm(tokens[:, :3], cache=more)
    lm(tokens[:, 3:20], cache=more)  # a chunk longer than doubling: exactly what it needs
    assert (more.capacity, more.length) == (20, 20)


def test_gqa_cache_stores_the_key_value_heads_only():
    for n_kv_heads in (1, 2, 4):
        lm = gqa_lm(n_kv_heads=n_kv_heads)
        cache = lm.new_cache(10)
        lm(torch.randint(0, V, (3, 6)), cache=cache)
        assert all(lay.keys.shape == lay.values.shape == (3, n_kv_heads, 10, 8) for lay in cache.layers)
        assert cache.nbytes == 2 * 2 * 3 * 10 * n_kv_heads * 8 * 4


def test_cache_refuses_another_batch_and_bad_capacities():
    lm = gqa_lm()
    cache = lm.new_cache(8)
    lm(torch.randint(0, V, (2, 3)), cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        lm(torch.randint(0, V, (1, 1)), cache=cache)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            lm.new_cache(bad)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cached_prompt_chunks_attend_causally(backend):
    """Several tokens appended to a non-empty cache (q_len > 1, kv_len > q_len) get the bottom-right causal
    mask, with grouped-query heads read from the cache in place (sdpa) or repeated (math)."""
    cfg = BlockConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, attention=backend)
    torch.manual_seed(0)
    lm = LanguageModel(cfg, 2, V, 64, positions="rope").double().eval()
    tokens = torch.randint(0, V, (2, 20))
    cache = lm.new_cache(20)
    pieces = [lm(tokens[:, :4], cache=cache), lm(tokens[:, 4:11], cache=cache), lm(tokens[:, 11:20], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, 1), lm(tokens), rtol=0, atol=1e-10)


def test_generate_returns_fresh_tokens_and_ends_rows_at_eos():
    lm = gqa_lm()
    prompt = torch.randint(0, V, (3, 4))
    free = lm.generate(prompt, 12, temperature=0)
    assert free.is_contiguous() and free.shape == (3, 16)
    eos = int(free[0, 6])
    ended = lm.generate(prompt, 12, temperature=0, eos_token_id=eos, pad_token_id=V - 1)
    assert ended.is_contiguous() and torch.equal(ended, lm.generate(prompt, 12, temperature=0, eos_token_id=eos,
                                                                    pad_token_id=V - 1, use_cache=False))
    first_eos = (free[0, 4:] == eos).nonzero()[0, 0] + 4
    assert torch.equal(ended[0, : first_eos + 1], free[0, : first_eos + 1])
    assert (ended[0, first_eos + 1 :] == V - 1).all()
    assert torch.equal(lm.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(prompt, -1)
    with pytest.raises(ValueError, match="top_k"):
        lm.generate(prompt, 2, top_k=0)


# ------------------------------------------------------------------------------------------- Hugging Face


def _hf_pair(kind):
    transformers = pytest.importorskip("transformers")
    common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                                                     n_positions=128, **common))
    else:  # grouped-query attention, 4 query heads per key/value head
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
            vocab_size=96, max_position_embeddings=128, rope_theta=500.0, **common))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    model.generation_config.pad_token_id = 0
    return model.eval(), tformer.from_hf(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_greedy_ids_equal_hugging_face_generate(kind):
    """Greedy generation through the preallocated cache, token for token as ``generate(do_sample=False)``, over
    a longer run (60 new tokens) and batch 1 and 4."""
    hf, model = _hf_pair(kind)
    for batch in (1, 4):
        ids = torch.randint(1, 96, (batch, 6), generator=torch.Generator().manual_seed(batch))
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                               use_cache=True)
        assert torch.equal(model.generate(ids, 60, temperature=0), expected)
