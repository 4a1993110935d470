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
