"""Separate switches: bias per part (norm, attention, feed-forward) and a stack's final norm."""

import dataclasses

import pytest
import torch

import tformer
from tformer import BlockConfig, ConfigError, Decoder, Encoder, EncoderBlock

BASE = dict(d_model=8, n_heads=2, d_ff=16, norm="layernorm", placement="pre")


def _biases(block):
    """Which parts of a block hold bias parameters."""
    names = [n for n, _ in block.named_parameters() if n.endswith("bias")]
    return {part: any(n.startswith(part) for n in names) for part in ("attn.", "ffn.", "attn_residual.", "ffn_residual.")}


@pytest.mark.parametrize(
    "switches, expected",
    [
        (dict(bias=True), dict(attn=True, ffn=True, norm=True)),
        (dict(bias=False), dict(attn=False, ffn=False, norm=False)),  # Llama, OLMo: no bias anywhere
        (dict(bias=False, ffn_bias=True), dict(attn=False, ffn=True, norm=False)),  # x-transformers' default
        (dict(bias=True, norm_bias=False), dict(attn=True, ffn=True, norm=False)),
        (dict(bias=True, attn_bias=False), dict(attn=False, ffn=True, norm=True)),
    ],
)
def test_bias_switches(switches, expected):
    block = EncoderBlock(BlockConfig(**BASE, **switches))
    got = _biases(block)
    assert got["attn."] is expected["attn"] and got["ffn."] is expected["ffn"]
    assert got["attn_residual."] is expected["norm"] and got["ffn_residual."] is expected["norm"]


def test_bias_sets_the_switches_left_at_none_also_after_replace():
    cfg = BlockConfig(**BASE, ffn_bias=True)
    off = dataclasses.replace(cfg, bias=False)
    assert (off.use_norm_bias, off.use_attn_bias, off.use_ffn_bias) == (False, False, True)
    assert dataclasses.asdict(off)["norm_bias"] is None  # the field keeps "follow bias"


@pytest.mark.parametrize("field", ["norm_bias", "attn_bias", "ffn_bias"])
def test_bias_switch_validation(field):
    with pytest.raises(ConfigError, match=f"{field}=1.*True, False or None"):
        BlockConfig(**BASE, **{field: 1})


@pytest.mark.parametrize("final_norm, expected", [(None, True), (True, True), (False, False)])
def test_pre_stack_final_norm_switch(final_norm, expected):
    torch.manual_seed(0)
    encoder = Encoder(BlockConfig(**BASE), 2, final_norm=final_norm)
    assert (encoder.final_norm is not None) is expected
    x = torch.randn(2, 5, 8)
    stream = x
    for block in encoder.layers:
        stream = block(stream)
    want = encoder.final_norm(stream) if expected else stream
    torch.testing.assert_close(encoder(x), want)


@pytest.mark.parametrize("final_norm, expected", [(None, False), (True, True), (False, False)])
def test_post_stack_final_norm_switch(final_norm, expected):
    decoder = Decoder(BlockConfig(**{**BASE, "placement": "post"}), 2, cross_attention=False, final_norm=final_norm)
    assert (decoder.final_norm is not None) is expected


def test_final_norm_validation():
    with pytest.raises(ConfigError, match="final_norm='yes'"):
        Encoder(BlockConfig(**BASE), 1, final_norm="yes")


def test_decoder_causal_switch():
    """causal=False: a position sees the whole (non-padding) sequence; causal=True: never the future."""
    torch.manual_seed(0)
    cfg = BlockConfig(**BASE, attention="math")
    x = torch.randn(1, 6, 8)
    future = x.clone()
    future[:, 4:] += torch.randn(1, 2, 8)  # not a constant shift, which LayerNorm would remove
    causal = tformer.DecoderBlock(cfg, cross_attention=False)
    open_block = tformer.DecoderBlock(cfg, cross_attention=False, causal=False)
    open_block.load_state_dict(causal.state_dict())
    torch.testing.assert_close(causal(x)[:, :4], causal(future)[:, :4])
    assert not torch.allclose(open_block(x)[:, :4], open_block(future)[:, :4])
    encoder = tformer.EncoderBlock(cfg)
    encoder.load_state_dict({k: v for k, v in causal.state_dict().items()})
    torch.testing.assert_close(open_block(x), encoder(x))  # a non-causal decoder block is an encoder block
