import math

import pytest
import torch

import tformer
from tformer import BlockConfig, deepnorm_constants
from tformer.placements import LayerContext


@pytest.mark.parametrize("n", [1, 6, 12, 100])
def test_encoder_only(n):
    c = deepnorm_constants(n, 0)
    assert c["decoder"] is None
    assert c["encoder"] == pytest.approx(((2 * n) ** 0.25, (8 * n) ** -0.25))


@pytest.mark.parametrize("m", [1, 6, 24])
def test_decoder_only(m):
    c = deepnorm_constants(0, m)
    assert c["encoder"] is None
    assert c["decoder"] == pytest.approx(((2 * m) ** 0.25, (8 * m) ** -0.25))


@pytest.mark.parametrize("n, m", [(6, 6), (12, 6), (100, 100), (18, 3), (1, 1)])
def test_encoder_decoder(n, m):
    c = deepnorm_constants(n, m)
    assert c["encoder"] == pytest.approx((0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)))
    assert c["decoder"] == pytest.approx(((3 * m) ** 0.25, (12 * m) ** -0.25))


def test_worked_values_from_reference():
    alpha, beta = deepnorm_constants(6, 0)["encoder"]
    assert (round(alpha, 3), round(beta, 3)) == (1.861, 0.380)
    c = deepnorm_constants(6, 6)
    assert round(c["encoder"][0], 3) == 1.418
    assert (round(c["decoder"][0], 3), round(c["decoder"][1], 3)) == (2.060, 0.343)
    # the 0.87 of the paper, not the 1.15 of one public implementation
    assert c["encoder"][1] == pytest.approx(0.87 / 6 ** (5 / 16))


@pytest.mark.parametrize("bad", [(0, 0), (-1, 2), (2.5, 1), (True, 1)])
def test_bad_depths(bad):
    with pytest.raises(ValueError):
        deepnorm_constants(*bad)


def test_models_pick_constants_from_their_own_architecture():
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, placement="deepnorm")
    s2s = tformer.EncoderDecoder(cfg, 4, 2, vocab_size=11)
    enc, dec = deepnorm_constants(4, 2)["encoder"], deepnorm_constants(4, 2)["decoder"]
    for block in s2s.encoder.layers:
        for _, placement in block.residual_sublayers().values():
            assert (placement.alpha, placement.branch_init.gain) == pytest.approx(enc)
    for block in s2s.decoder.layers:
        assert len(block.residual_sublayers()) == 3
        for _, placement in block.residual_sublayers().values():
            assert (placement.alpha, placement.branch_init.gain) == pytest.approx(dec)
    lm = tformer.LanguageModel(cfg, 5, vocab_size=11, max_seq_len=8)
    assert lm.decoder.layers[0].ffn_residual.alpha == pytest.approx(deepnorm_constants(0, 5)["decoder"][0])
    encoder = tformer.Encoder(cfg, 3)
    assert encoder.layers[2].attn_residual.alpha == pytest.approx(deepnorm_constants(3, 0)["encoder"][0])


def test_init_gains_measured_from_weight_statistics():
    d, d_ff = 256, 1024
    cfg = BlockConfig(d_model=d, n_heads=8, d_ff=d_ff, norm="deepnorm")
    block = tformer.EncoderBlock(cfg, layer=LayerContext("encoder", 0, 6))
    beta = deepnorm_constants(6, 0)["encoder"][1]
    q, k, v = block.attn.qkv.weight.detach().split(d)

    def xavier_std(fan_in, fan_out, gain):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    expected = {
        "q": (q, xavier_std(d, d, 1.0)),
        "k": (k, xavier_std(d, d, 1.0)),
        "v": (v, xavier_std(d, d, beta)),
        "out": (block.attn.out.weight, xavier_std(d, d, beta)),
        "w1": (block.ffn.w1.weight, xavier_std(d, d_ff, beta)),
        "w2": (block.ffn.w2.weight, xavier_std(d_ff, d, beta)),
    }
    for name, (weight, std) in expected.items():
        weight = weight.detach()
        assert weight.std().item() == pytest.approx(std, rel=0.03), name
        assert abs(weight.mean().item()) < 0.05 * std, name
        # Xavier-normal, not uniform: a Gaussian's kurtosis is 3, a uniform's 1.8
        kurtosis = ((weight - weight.mean()) ** 4).mean() / weight.var() ** 2
        assert kurtosis.item() == pytest.approx(3.0, abs=0.2), name
    assert block.attn.qkv.bias.abs().sum() == 0 and block.ffn.w1.bias.abs().sum() == 0


def test_default_init_is_xavier_uniform_with_zero_biases():
    d = 256
    block = tformer.EncoderBlock(BlockConfig(d_model=d, n_heads=8, d_ff=4 * d))
    for weight, fan_in, fan_out in [
        (block.attn.qkv.weight[:d], d, d),
        (block.attn.qkv.weight[2 * d :], d, d),
        (block.ffn.w1.weight, d, 4 * d),
    ]:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.98 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert all(lin.bias.abs().sum() == 0 for lin in (block.attn.qkv, block.attn.out, block.ffn.w1, block.ffn.w2))


def test_gpt2_init_scheme():
    cfg = BlockConfig(d_model=128, n_heads=4, d_ff=512, init="gpt2")
    block = tformer.EncoderBlock(cfg)
    assert block.ffn.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    lm = tformer.LanguageModel(cfg, 1, vocab_size=1000, max_seq_len=4)
    assert lm.embedding.scale == 1.0
    assert tformer.LanguageModel(BlockConfig(d_model=128, n_heads=4), 1, 1000, 4).embedding.scale == pytest.approx(128**0.5)
