"""from_torch: parity with torch.nn.TransformerEncoderLayer / TransformerDecoderLayer."""

import dataclasses

import pytest
import torch
from torch import nn

import tformer
from tformer import DecoderBlock, EncoderBlock, from_torch

D, H, FF = 32, 4, 64


def _torch_layer(kind, norm_first, batch_first, activation, bias):
    cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    layer = cls(D, H, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                norm_first=norm_first, bias=bias, layer_norm_eps=1e-6)
    with torch.no_grad():  # non-trivial norms and biases so every copied tensor matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer.eval()


def _batch_major(t, batch_first):
    return t if batch_first else t.transpose(0, 1)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["autograd", "no_grad-fastpath"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_parity(norm_first, batch_first, activation, bias, grad_enabled):
    layer = _torch_layer("encoder", norm_first, batch_first, activation, bias)
    block = from_torch(layer)
    assert isinstance(block, EncoderBlock) and not block.training
    assert block.cfg.placement == ("pre" if norm_first else "post")
    assert (block.cfg.dropout, block.cfg.attn_dropout, block.cfg.norm_eps) == (0.1, 0.1, 1e-6)
    x = torch.randn(3, 7, D)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    with torch.set_grad_enabled(grad_enabled):
        expected = _batch_major(layer(_batch_major(x, batch_first), src_key_padding_mask=pad), batch_first)
        ours = block(x, padding_mask=pad)
    torch.testing.assert_close(ours[~pad], expected[~pad], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_parity(norm_first, batch_first, activation, bias):
    layer = _torch_layer("decoder", norm_first, batch_first, activation, bias)
    block = from_torch(layer)
    assert isinstance(block, DecoderBlock) and block.has_cross_attention
    x, memory = torch.randn(3, 6, D), torch.randn(3, 5, D)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    memory_pad = torch.zeros(3, 5, dtype=torch.bool)
    memory_pad[2, 3:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = may not attend
    expected = layer(_batch_major(x, batch_first), _batch_major(memory, batch_first), tgt_mask=causal,
                     tgt_is_causal=True, tgt_key_padding_mask=pad, memory_key_padding_mask=memory_pad)
    ours = block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    expected = _batch_major(expected, batch_first)
    torch.testing.assert_close(ours[~pad], expected[~pad], rtol=0, atol=1e-5)


def test_switch_placement_after_import():
    block = from_torch(_torch_layer("encoder", False, True, "relu", True))
    sandwich = EncoderBlock(dataclasses.replace(block.cfg, placement="sandwich"))
    copied = sandwich.load_state_dict({k: v for k, v in block.state_dict().items() if ".norm." not in k}, strict=False)
    assert all(".norm_" in k for k in copied.missing_keys)
    assert sandwich(torch.randn(2, 3, D)).shape == (2, 3, D)


def test_train_mode_is_carried_over():
    layer = _torch_layer("encoder", True, True, "gelu", True).train()
    assert from_torch(layer).training


def test_unsupported_inputs():
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        from_torch(nn.Linear(2, 2))
    layer = nn.TransformerEncoderLayer(D, H, FF, activation=torch.tanh)
    with pytest.raises(ValueError, match="activation"):
        from_torch(layer)


def test_backends_match_torch_too():
    layer = _torch_layer("decoder", True, True, "relu", True)
    x, memory = torch.randn(2, 4, D), torch.randn(2, 3, D)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    expected = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
    for attention in ("math", "sdpa", "auto"):
        torch.testing.assert_close(from_torch(layer, attention=attention)(x, memory=memory), expected, rtol=0, atol=1e-5)
    assert tformer.BlockConfig  # public
