"""Switching a built model's placement: weights carried over by name, the rest initialized, input untouched."""

import pytest
import torch

import tformer
from tformer import BlockConfig, ConfigError
from tformer.switch_placement import with_placement


def _lm(**kw):
    torch.manual_seed(0)
    return tformer.LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32, placement="pre", **kw), 2, 19, 12).eval()


def test_pre_to_post_keeps_every_weight_and_changes_the_function():
    lm = _lm()
    post = with_placement(lm, "post")
    assert post.spec.cfg.placement == "post" and lm.spec.cfg.placement == "pre"
    assert post.initialized == [] and not post.training
    for name, tensor in post.state_dict().items():
        if name in lm.state_dict():
            torch.testing.assert_close(tensor, lm.state_dict()[name])
    tokens = torch.randint(0, 19, (2, 9))
    assert not torch.allclose(post(tokens), lm(tokens))  # same weights, another function: fine-tune it


def test_pre_to_sandwich_initializes_the_norms_it_adds_and_copies_the_rest():
    lm = _lm()
    sandwich = with_placement(lm, "sandwich")
    assert all("norm_in" in k or "norm_out" in k for k in sandwich.initialized)
    assert any(k.endswith("attn.qkv.weight") for k in sandwich.carried_over)
    torch.testing.assert_close(sandwich.embedding.tokens.weight, lm.embedding.tokens.weight)


def test_switch_with_other_changes_and_per_layer_placements_reset():
    torch.manual_seed(0)
    lm = tformer.LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32), 4, 19, 12, placements=["post"] * 2 + ["pre"] * 2)
    switched = with_placement(lm.double(), "pre", norm="rmsnorm")
    assert switched.spec.placements is None and switched.decoder.placements == ["pre"] * 4
    assert next(switched.parameters()).dtype == torch.float64
    assert any("norm" in k for k in switched.carried_over)  # LayerNorm gains -> RMSNorm gains (same shape)


def test_refuses_what_is_not_a_tformer_model():
    with pytest.raises(ConfigError, match="built from a config"):
        with_placement(torch.nn.Linear(2, 2), "pre")
