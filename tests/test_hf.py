"""Hugging Face interop (``tformer.from_hf`` / ``tformer.to_hf``) on tiny random models built offline.

Every family: logits (or BERT's last hidden state) equal to Hugging Face's at the non-padding positions
with and without right padding, greedy generation token for token, both round trips of the state dict,
and the refusals. Skipped without the ``hf`` extra.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch

import tformer

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 12
ATOL = RTOL = 1e-5


def perturbed(hf_model, seed: int = 0):
    """``hf_model`` in eval mode with every parameter moved off its init (norm gains off 1, biases off 0),
    so that a weight landing in the wrong place shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.pad_token_id = 0
    return hf_model.eval()


def gpt2(**overrides):
    config = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=None,
                  eos_token_id=None)
    return transformers.GPT2Config(**{**config, **overrides})


def llama(**overrides):
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, rope_theta=500.0)
    return transformers.LlamaConfig(**{**config, **overrides})


def olmo2(**overrides):
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, rope_theta=500.0)
    return transformers.Olmo2Config(**{**config, **overrides})


def gemma2(**overrides):
    """Heads twice as wide as hidden / heads, a query_pre_attn_scalar of its own, both soft-caps at values that
    bite on these logits, and a sliding window longer than every test input (so it hides nothing)."""
    config = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, query_pre_attn_scalar=12,
                  sliding_window=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, rope_theta=500.0)
    return transformers.Gemma2Config(**{**config, **overrides})


def bert(**overrides):
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
                  max_position_embeddings=64)
    return transformers.BertConfig(**{**config, **overrides})


CAUSAL = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2()),
    "gpt2-untied-relu": lambda: transformers.GPT2LMHeadModel(gpt2(tie_word_embeddings=False, activation_function="relu",
                                                                   n_inner=48)),
    "llama": lambda: transformers.LlamaForCausalLM(llama()),
    "llama-tied-bias-mha": lambda: transformers.LlamaForCausalLM(llama(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4, hidden_act="gelu")),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(olmo2()),
    "olmo2-mqa-bias": lambda: transformers.Olmo2ForCausalLM(olmo2(num_key_value_heads=1, attention_bias=True)),
    "gpt2-eager": lambda: transformers.GPT2LMHeadModel(gpt2(attn_implementation="eager")),
    "llama-eager": lambda: transformers.LlamaForCausalLM(llama(attn_implementation="eager")),
    "llama-wide-heads-geglu-tanh": lambda: transformers.LlamaForCausalLM(llama(head_dim=16,
                                                                               hidden_act="gelu_pytorch_tanh")),
    "olmo2-narrow-heads": lambda: transformers.Olmo2ForCausalLM(olmo2(head_dim=4)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(gemma2()),
    "gemma2-untied-gelu-mha-bias-uncapped": lambda: transformers.Gemma2ForCausalLM(gemma2(
        tie_word_embeddings=False, hidden_activation="gelu", num_key_value_heads=4, attention_bias=True, head_dim=8,
        query_pre_attn_scalar=8, attn_logit_softcapping=None, final_logit_softcapping=None,
        layer_types=["full_attention"] * 3)),
}


def right_padding(batch: int = 3, seq: int = SEQ) -> torch.Tensor:
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[1, seq - 4:] = True
    pad[2, 3:] = True
    return pad


def tokens(batch: int = 3, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prompt(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    """Token ids without the pad id 0, from which ``generate`` would infer padding."""
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def causal_logits(hf_model, ids, pad):
    with torch.no_grad():
        mask = None if pad is None else (~pad).long()
        return hf_model(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------------------- from_hf


@pytest.fixture(params=list(CAUSAL), scope="module")
def causal_pair(request):
    torch.manual_seed(0)
    hf_model = perturbed(CAUSAL[request.param]())
    return hf_model, tformer.from_hf(hf_model)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "right-padding"])
def test_causal_lm_logits_equal(causal_pair, padded):
    hf_model, model = causal_pair
    ids, pad = tokens(), right_padding() if padded else None
    expected = causal_logits(hf_model, ids, pad)
    with torch.no_grad():
        got = model(ids, padding_mask=pad)
    real = torch.ones_like(ids, dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=RTOL)


def test_causal_lm_generates_as_hugging_face(causal_pair):
    hf_model, model = causal_pair
    ids = prompt()
    expected = hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    got = model.generate(ids, 8, temperature=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows_ending", [1, 2])
def test_generation_ends_rows_at_eos_as_hugging_face(rows_ending):
    torch.manual_seed(0)
    hf_model = perturbed(transformers.LlamaForCausalLM(llama()))
    start = prompt()
    free = hf_model.generate(start, max_new_tokens=8, do_sample=False)
    eos = [int(t) for t in free[:rows_ending, start.shape[1] + 2]]  # what row 0 (and 1) emit third
    hf_model.generation_config.eos_token_id = eos if rows_ending > 1 else eos[0]
    hf_model.generation_config.pad_token_id = 0
    model = tformer.from_hf(hf_model)
    assert model.eos_token_id == hf_model.generation_config.eos_token_id and model.pad_token_id == 0
    expected = hf_model.generate(start, max_new_tokens=8, do_sample=False)
    got = model.generate(start, 8, temperature=0)
    assert torch.equal(got, expected)
    assert (got.shape[1] < free.shape[1]) == (rows_ending == 2)  # all rows ended: stopped early
    back = tformer.to_hf(model)
    assert back.generation_config.eos_token_id == hf_model.generation_config.eos_token_id
    assert torch.equal(back.generate(start, max_new_tokens=8, do_sample=False), expected)


def test_causal_lm_round_trips_the_state_dict(causal_pair):
    hf_model, model = causal_pair
    back = tformer.to_hf(model)
    assert type(back) is type(hf_model)
    assert_state_dicts_equal(back.state_dict(), hf_model.state_dict())
    again = tformer.from_hf(back)
    assert_state_dicts_equal(again.state_dict(), model.state_dict())
    assert again.spec == model.spec


def test_from_hf_copies_and_keeps_mode_and_tying():
    hf_model = transformers.GPT2LMHeadModel(gpt2())  # built in training mode
    model = tformer.from_hf(hf_model)
    assert model.training and model.head.weight is model.embedding.tokens.weight
    assert model.embedding.tokens.weight.data_ptr() != hf_model.transformer.wte.weight.data_ptr()
    assert not tformer.from_hf(hf_model.eval()).training
    untied = tformer.from_hf(transformers.LlamaForCausalLM(llama()))
    assert untied.head.weight is not untied.embedding.tokens.weight
    assert untied.cfg.n_kv_heads == 2 and untied.cfg.rope_base == 500.0 and untied.spec.positions == "rope"


def test_from_hf_keeps_dtype():
    hf_model = perturbed(transformers.GPT2LMHeadModel(gpt2())).to(torch.float64)
    model = tformer.from_hf(hf_model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    ids = tokens()
    torch.testing.assert_close(model(ids), causal_logits(hf_model, ids, None), atol=1e-12, rtol=1e-12)
    assert tformer.to_hf(model).lm_head.weight.dtype == torch.float64
    half = tformer.from_hf(transformers.LlamaForCausalLM(llama()).to(torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert tformer.to_hf(half).model.embed_tokens.weight.dtype == torch.bfloat16


def test_gemma2_maps_to_sandwich_with_its_options():
    hf_model = perturbed(transformers.Gemma2ForCausalLM(gemma2()))
    model = tformer.from_hf(hf_model)
    cfg = model.cfg
    assert (cfg.norm, cfg.placement, cfg.norm_options, cfg.activation) == (
        "rmsnorm", "sandwich", {"unit_offset": True}, "geglu_tanh")
    assert (cfg.head_dim, cfg.head_size, cfg.attn_softcap, model.spec.logit_softcap) == (16, 16, 5.0, 3.0)
    assert cfg.attn_scale == 12**-0.5 and model.embedding.scale == math.sqrt(32)
    assert model.spec.max_seq_len == 24  # the sliding window, not max_position_embeddings
    norm = model.decoder.layers[0].attn_residual.norm_out
    assert torch.equal(norm.weight, hf_model.model.layers[0].post_attention_layernorm.weight)  # w, not 1 + w


def test_gemma2_soft_caps_change_the_logits():
    """The parity above is not parity of capped values that never bite: without the caps the logits move."""
    hf_model = perturbed(transformers.Gemma2ForCausalLM(gemma2()))
    model = tformer.from_hf(hf_model)
    uncapped = tformer.from_hf(perturbed(transformers.Gemma2ForCausalLM(gemma2(
        attn_logit_softcapping=None, final_logit_softcapping=None))))
    ids = tokens()
    with torch.no_grad():
        capped_logits = model(ids)
        assert capped_logits.abs().max() < 3.0  # within the final cap
        assert (uncapped(ids) - capped_logits).abs().max() > 0.1


def test_gemma2_sliding_window_is_honoured_by_refusing_longer_inputs():
    hf_model = perturbed(transformers.Gemma2ForCausalLM(gemma2(sliding_window=8)))
    model = tformer.from_hf(hf_model)
    ids = tokens(seq=8)
    torch.testing.assert_close(model(ids), causal_logits(hf_model, ids, None), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match=r"length 9 exceeds max_seq_len=8 \(Gemma 2's sliding window.*sliding_window=8"):
        model(tokens(seq=9))
    with pytest.raises(ValueError, match="sliding_window=8"):
        model.generate(prompt(seq=5), 4)
    back = tformer.to_hf(model)  # the source's window and length come back
    assert (back.config.sliding_window, back.config.max_position_embeddings) == (8, 64)
    assert back.config.layer_types == hf_model.config.layer_types


def test_olmo2_maps_to_output_placement_with_full_qk_norm():
    model = tformer.from_hf(transformers.Olmo2ForCausalLM(olmo2(num_key_value_heads=1)))
    assert model.cfg.placement == "output" and model.cfg.qk_norm == "full" and model.cfg.norm == "rmsnorm"
    attn = model.decoder.layers[0].attn
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (8,)  # whole q / k projections


# ------------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_pair():
    torch.manual_seed(0)
    hf_model = perturbed(transformers.BertModel(bert()))
    return hf_model, tformer.from_hf(hf_model)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "right-padding"])
@pytest.mark.parametrize("types", [False, True], ids=["no-token-types", "token-types"])
def test_bert_last_hidden_state_equal(bert_pair, padded, types):
    hf_model, model = bert_pair
    ids, pad = tokens(), right_padding() if padded else None
    type_ids = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(2)) if types else None
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=None if pad is None else (~pad).long(),
                            token_type_ids=type_ids).last_hidden_state
        got = model(ids, padding_mask=pad, token_type_ids=type_ids)
    real = torch.ones_like(ids, dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=RTOL)


def test_bert_is_a_post_ln_encoder_model(bert_pair):
    _, model = bert_pair
    assert isinstance(model, tformer.EncoderModel)
    assert model.cfg.placement == "post" and model.spec.embed_norm and model.spec.n_token_types == 2
    assert model.cfg.norm_eps == 1e-12 and model.encoder.final_norm is None


def test_bert_round_trips_the_state_dict_with_its_pooler(bert_pair):
    hf_model, model = bert_pair
    back = tformer.to_hf(model)
    assert back.pooler is not None
    assert_state_dicts_equal(back.state_dict(), hf_model.state_dict())
    assert_state_dicts_equal(tformer.from_hf(back).state_dict(), model.state_dict())
    no_pooler = transformers.BertModel(bert(), add_pooling_layer=False)
    assert tformer.to_hf(tformer.from_hf(no_pooler)).pooler is None


# ------------------------------------------------------------------------------------------- to_hf


def lm(cfg, **kwargs):
    torch.manual_seed(0)
    model = tformer.LanguageModel(cfg, 2, VOCAB, 64, **kwargs)
    with torch.no_grad():  # norm gains and biases off their init, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


LLAMA_LIKE = tformer.BlockConfig(d_model=32, n_heads=4, d_ff=64, norm="rmsnorm", placement="pre",
                                 activation="swiglu", bias=False, n_kv_heads=2, init="gpt2", rope_base=1000.0)

DIRECT = {
    "llama": (LLAMA_LIKE, dict(positions="rope", tie_embeddings=False), "LlamaForCausalLM"),
    "llama-xavier-untied": (dataclasses.replace(LLAMA_LIKE, init="xavier", activation="geglu"),
                            dict(positions="rope", tie_embeddings=False), "LlamaForCausalLM"),
    "olmo2": (dataclasses.replace(LLAMA_LIKE, placement="output", qk_norm="full", attn_bias=True),
              dict(positions="rope", tie_embeddings=True), "Olmo2ForCausalLM"),
    "gpt2": (tformer.BlockConfig(d_model=32, n_heads=4, d_ff=80, activation="gelu_tanh", init="gpt2", norm_eps=1e-6),
             dict(positions="learned"), "GPT2LMHeadModel"),
    "llama-wide-heads": (dataclasses.replace(LLAMA_LIKE, head_dim=12), dict(positions="rope", tie_embeddings=False),
                         "LlamaForCausalLM"),
    "gemma2": (dataclasses.replace(LLAMA_LIKE, placement="sandwich", norm_options={"unit_offset": True}, init="xavier",
                                   activation="geglu_tanh", head_dim=12, attn_scale=1 / 3, attn_softcap=4.0),
               dict(positions="rope", logit_softcap=2.0), "Gemma2ForCausalLM"),
    "gemma2-untied-geglu": (dataclasses.replace(LLAMA_LIKE, placement="sandwich", norm_options={"unit_offset": True},
                                                init="xavier", activation="geglu"),
                            dict(positions="rope", tie_embeddings=False), "Gemma2ForCausalLM"),
}


@pytest.mark.parametrize("name", list(DIRECT))
def test_directly_built_model_exports_with_equal_logits(name):
    cfg, kwargs, hf_class = DIRECT[name]
    model = lm(cfg, **kwargs)
    hf_model = tformer.to_hf(model)
    assert type(hf_model).__name__ == hf_class and not hf_model.training
    ids, pad = tokens(), right_padding()
    with torch.no_grad():
        expected = model(ids, padding_mask=pad)
    torch.testing.assert_close(causal_logits(hf_model, ids, pad)[~pad], expected[~pad], atol=ATOL, rtol=RTOL)
    hf_model.generation_config.pad_token_id = 0
    start = prompt(seq=4, seed=3)
    expected_tokens = hf_model.generate(start, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(start, 6, temperature=0), expected_tokens)
    again = tformer.from_hf(hf_model)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, padding_mask=pad)[~pad], expected[~pad], atol=ATOL, rtol=RTOL)
    if model.embedding.scale == (math.sqrt(32) if hf_class.startswith("Gemma") else 1.0):  # nothing folded
        assert again.spec == model.spec
        assert_state_dicts_equal(again.state_dict(), model.state_dict())


def test_directly_built_encoder_exports_to_bert():
    cfg = tformer.BlockConfig(d_model=32, n_heads=4, d_ff=64, placement="post", activation="gelu")  # xavier: scaled
    for n_token_types in (0, 2):
        torch.manual_seed(0)
        model = tformer.EncoderModel(cfg, 2, VOCAB, 64, n_token_types=n_token_types, embed_norm=True).eval()
        hf_model = tformer.to_hf(model)
        assert type(hf_model).__name__ == "BertModel" and hf_model.pooler is None
        ids, pad = tokens(), right_padding()
        with torch.no_grad():
            expected = model(ids, padding_mask=pad)
            got = hf_model(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
        torch.testing.assert_close(got[~pad], expected[~pad], atol=ATOL, rtol=RTOL)


def test_to_hf_picks_the_named_family_and_refuses_unknown_ones():
    model = lm(LLAMA_LIKE, positions="rope", tie_embeddings=False)
    with pytest.raises(tformer.ConfigError, match=r"placement='pre'.*Olmo2ForCausalLM"):
        tformer.to_hf(model, family="olmo2")
    with pytest.raises(tformer.ConfigError, match="family='mistral'"):
        tformer.to_hf(model, family="mistral")


BASE = tformer.BlockConfig(d_model=32, n_heads=4, d_ff=64, init="gpt2")
GEMMA_LIKE = dataclasses.replace(LLAMA_LIKE, placement="sandwich", norm_options={"unit_offset": True}, init="xavier",
                                 activation="geglu_tanh")


@pytest.mark.parametrize("cfg, kwargs, field", [
    (dataclasses.replace(BASE, norm="powernorm", placement="deepnorm"), {}, "norm='powernorm'"),
    (dataclasses.replace(BASE, placement="deepnorm"), {}, "placement='deepnorm'"),
    (dataclasses.replace(BASE, placement="mixln"), {}, "placement='mixln'"),
    (dataclasses.replace(BASE, placement="sandwich"), {}, "placement='sandwich'"),
    (BASE, {"placements": ["pre", "post"]}, "placements=('pre', 'post')"),
    (dataclasses.replace(BASE, norm="rmsnorm"), {}, "norm='rmsnorm'"),
    (dataclasses.replace(BASE, activation="swiglu"), {}, "activation='swiglu'"),
    (dataclasses.replace(BASE, ffn_bias=False), {}, "ffn_bias=False"),
    (dataclasses.replace(BASE, n_kv_heads=2), {}, "n_kv_heads=2"),
    (dataclasses.replace(BASE, init="xavier"), {}, "init='xavier'"),
    (BASE, {"positions": "sinusoidal"}, "positions='sinusoidal'"),
    (dataclasses.replace(LLAMA_LIKE, activation="silu"), {"positions": "rope"}, "activation='silu'"),
    (dataclasses.replace(LLAMA_LIKE, qk_norm="head"), {"positions": "rope"}, "qk_norm='head'"),
    (dataclasses.replace(LLAMA_LIKE, norm="dyt"), {"positions": "rope"}, "norm='dyt'"),
    (dataclasses.replace(LLAMA_LIKE, placement="output", ffn_bias=True), {"positions": "rope"}, "ffn_bias=True"),
    (dataclasses.replace(LLAMA_LIKE, placement="output"), {"positions": "rope"}, "qk_norm=False"),
    (LLAMA_LIKE, {"positions": "rope", "head_bias": True}, "head_bias=True"),
    (dataclasses.replace(BASE, head_dim=16), {}, "head_dim=16"),
    (dataclasses.replace(BASE, attn_scale=0.5), {}, "attn_scale=0.5"),
    (dataclasses.replace(LLAMA_LIKE, attn_softcap=30.0), {"positions": "rope"}, "attn_softcap=30.0"),
    (LLAMA_LIKE, {"positions": "rope", "logit_softcap": 30.0}, "logit_softcap=30.0"),
    (dataclasses.replace(LLAMA_LIKE, placement="sandwich"), {"positions": "rope"}, "activation='swiglu'"),
    (dataclasses.replace(GEMMA_LIKE, norm_options={}), {"positions": "rope"}, "norm_options={}"),
    (dataclasses.replace(GEMMA_LIKE, qk_norm="head"), {"positions": "rope"}, "qk_norm='head'"),
    (dataclasses.replace(GEMMA_LIKE, ffn_bias=True), {"positions": "rope"}, "ffn_bias=True"),
    (dataclasses.replace(GEMMA_LIKE, init="gpt2"), {"positions": "rope"}, "init='gpt2'"),
    (dataclasses.replace(GEMMA_LIKE, placement="pre"), {"positions": "rope"}, "norm_options={'unit_offset': True}"),
])
def test_to_hf_refuses_the_first_field_without_an_equivalent(cfg, kwargs, field):
    model = tformer.LanguageModel(cfg, 2, VOCAB, 64, **kwargs)
    with pytest.raises(tformer.ConfigError, match=f"to_hf: {_escaped(field)} has no equivalent"):
        tformer.to_hf(model)


def _escaped(text: str) -> str:
    return re.escape(text)


def test_to_hf_refuses_what_bert_cannot_express():
    cfg = dataclasses.replace(BASE, placement="post")
    with pytest.raises(tformer.ConfigError, match="embed_norm=False"):
        tformer.to_hf(tformer.EncoderModel(cfg, 2, VOCAB, 64))
    with pytest.raises(tformer.ConfigError, match="final_norm=True"):
        tformer.to_hf(tformer.EncoderModel(cfg, 2, VOCAB, 64, embed_norm=True, final_norm=True))
    with pytest.raises(tformer.ConfigError, match="placement='pre'.*BertModel"):
        tformer.to_hf(tformer.EncoderModel(BASE, 2, VOCAB, 64, embed_norm=True))
    with pytest.raises(tformer.ConfigError, match="model='EncoderDecoder'"):
        tformer.to_hf(tformer.EncoderDecoder(BASE, 1, 1, VOCAB))


# ------------------------------------------------------------------------------------------- from_hf refusals


@pytest.mark.parametrize("build, match", [
    (lambda: transformers.GPT2LMHeadModel(gpt2(scale_attn_by_inverse_layer_idx=True)),
     "scale_attn_by_inverse_layer_idx"),
    (lambda: transformers.GPT2LMHeadModel(gpt2(reorder_and_upcast_attn=True)), "reorder_and_upcast_attn"),
    (lambda: transformers.GPT2LMHeadModel(gpt2(add_cross_attention=True)), "add_cross_attention"),
    (lambda: transformers.GPT2LMHeadModel(gpt2(scale_attn_weights=False)), "scale_attn_weights"),
    (lambda: transformers.GPT2LMHeadModel(gpt2(activation_function="quick_gelu")), "activation_function='quick_gelu'"),
    (lambda: transformers.LlamaForCausalLM(llama(pretraining_tp=2)), "pretraining_tp=2"),
    (lambda: transformers.Gemma2ForCausalLM(gemma2(use_bidirectional_attention=True)),
     "use_bidirectional_attention=True"),
    (lambda: transformers.Gemma2ForCausalLM(gemma2(hidden_activation="relu")), "hidden_activation='relu'"),
    (lambda: transformers.LlamaForCausalLM(llama(hidden_act="relu")), "hidden_act='relu'"),
    (lambda: transformers.LlamaForCausalLM(llama(rope_scaling={"rope_type": "linear", "factor": 2.0})), "'linear'"),
    (lambda: transformers.BertModel(bert(is_decoder=True)), "is_decoder"),
    (lambda: transformers.BertModel(bert(hidden_act="tanh")), "hidden_act='tanh'"),
    (lambda: transformers.GPT2Model(gpt2()), "GPT2Model is not a supported architecture"),
    (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB)), "MistralForCausalLM is not a supported architecture"),
])
def test_from_hf_refuses_what_tformer_does_not_compute(build, match):
    with pytest.raises(tformer.ConfigError, match=_escaped(match)):
        tformer.from_hf(build())


def test_llama3_rope_scaling_is_refused():
    config = llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(tformer.ConfigError, match="'llama3'"):
        tformer.from_hf(transformers.LlamaForCausalLM(config))


def test_tformer_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import tformer; "
            "assert callable(tformer.from_hf) and callable(tformer.to_hf)\n"
            "m = tformer.LanguageModel(tformer.BlockConfig(d_model=8, n_heads=2, d_ff=8, init='gpt2'), 1, 10, 8)\n"
            "try:\n    tformer.to_hf(m)\nexcept ImportError as e:\n    assert 'tformer[hf]' in str(e)\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------- LayerNorm -> RMSNorm on GPT-2


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_converted_gpt2_keeps_its_logits_as_pre_rmsnorm(tied):
    """Jiang et al. 2023 on a real architecture: Hugging Face GPT-2 -> tformer -> exact Pre-RMSNorm."""
    import tformer.convert

    torch.manual_seed(0)
    hf_model = perturbed(transformers.GPT2LMHeadModel(gpt2(tie_word_embeddings=tied)))
    rms = tformer.convert.layernorm_to_rmsnorm(tformer.from_hf(hf_model))
    assert rms.spec.cfg.norm == "rmsnorm" and rms.head.bias is not None
    ids, pad = tokens(), right_padding()
    with torch.no_grad():
        got = rms(ids, padding_mask=pad)
    torch.testing.assert_close(got[~pad], causal_logits(hf_model, ids, pad)[~pad], rtol=RTOL, atol=ATOL)


def test_converted_gemma2_saves_and_loads_with_its_options(tmp_path):
    hf_model = perturbed(transformers.Gemma2ForCausalLM(gemma2()))
    model = tformer.from_hf(hf_model)
    tformer.save(model, tmp_path / "gemma2.safetensors")
    loaded = tformer.load(tmp_path / "gemma2.safetensors").eval()
    assert loaded.spec == model.spec  # soft-caps, head width, scale and the (1 + w) norms travel in the spec
    ids = tokens()
    torch.testing.assert_close(loaded(ids), causal_logits(hf_model, ids, None), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------- recipes


LLAMA_RECIPE = [
    "model.n_layers=2", "model.max_seq_len=32", "model.positions=rope", "model.tie_embeddings=false",
    "model.block.d_model=32", "model.block.n_heads=4", "model.block.n_kv_heads=2", "model.block.d_ff=64",
    "model.block.norm=rmsnorm", "model.block.activation=swiglu", "model.block.bias=false",
    "data.seq_len=32", "data.eval_windows=8", "train.batch_size=4", "train.warmup_steps=2", "log.every=1",
    "log.eval_every=100", "log.progress=false",
]


def test_recipe_trained_model_exports_to_transformers_and_fine_tunes_from_there(tmp_path):
    """A Llama-shaped model trained by the LM recipe exports (to_hf + save_pretrained), loads in transformers
    with the same logits, and a second run starts from that directory (model.init_from=hf:DIR)."""
    from tformer.recipe_config import load_config
    from tformer.training import recipe_defaults, train

    train(load_config(recipe_defaults("lm"), None, [*LLAMA_RECIPE, f"out_dir={tmp_path}", "train.steps=6"]),
          progress=False)
    trained = tformer.load(tmp_path / "run" / "model.safetensors").eval()
    export = tmp_path / "hf-export"
    tformer.to_hf(trained).save_pretrained(export)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(ids), atol=ATOL, rtol=RTOL)

    overrides = [*LLAMA_RECIPE, f"model.init_from=hf:{export}", f"out_dir={tmp_path}", "run=from-hf",
                 "train.steps=2", "train.lr=0"]
    train(load_config(recipe_defaults("lm"), None, overrides), progress=False)
    tuned = tformer.load(tmp_path / "from-hf" / "model.safetensors").eval()
    with torch.no_grad():  # lr=0: the run's weights are the exported model's, so are its logits
        torch.testing.assert_close(tuned(ids), trained(ids), atol=ATOL, rtol=RTOL)

    with pytest.raises(tformer.ConfigError, match="could not load a causal LM from"):
        train(load_config(recipe_defaults("lm"), None, [*LLAMA_RECIPE, f"model.init_from=hf:{tmp_path / 'nope'}",
                                                        f"out_dir={tmp_path}", "run=nope"]), progress=False)
    small_vocab = tmp_path / "vocab-96"
    perturbed(transformers.LlamaForCausalLM(llama())).save_pretrained(small_vocab)
    with pytest.raises(tformer.ConfigError, match=r"vocab_size=96, but the data's tokenizer \(data.tokenizer=byte\) has 256 ids"):
        train(load_config(recipe_defaults("lm"), None, [*LLAMA_RECIPE, f"model.init_from=hf:{small_vocab}",
                                                        f"out_dir={tmp_path}", "run=small"]), progress=False)
