"""Padding-free stacks (``tformer.packing``): a padded batch runs on its real tokens only.

The packed path must give the padded path's outputs and gradients at every real position, for every
norm x placement, encoder, causal decoder and encoder-decoder, with rotary positions and grouped-query
attention, whatever the padding (left, right, in between, whole rows); zeros at padding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tformer
from conftest import GRID, quick_norm_options
from tformer import BlockConfig, Decoder, Encoder, EncoderDecoder
from tformer.analysis import TrainingMonitor
from tformer.backends import attention_mask, is_right_padded
from tformer.packing import Packing

D = 8


def config(norm="layernorm", placement="pre", **kw):
    kw.setdefault("attention", "sdpa")
    return BlockConfig(d_model=D, n_heads=2, d_ff=16, norm=norm, placement=placement,
                       norm_options=quick_norm_options(norm), **kw)


def ragged_padding() -> torch.Tensor:
    """Right, left, in-between and no padding, one row each, plus a row of one token."""
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :3] = True
    pad[2, 2:5] = True
    pad[4, 1:] = True
    return pad


def packed_and_padded(model: nn.Module, run):
    """``run(model)`` packed and on an identical copy with packing switched off."""
    padded = copy.deepcopy(model)
    for stack in padded.modules():
        if hasattr(stack, "pack_padding"):
            stack.pack_padding = False
    return run(model), run(padded), padded


def assert_same_at_real_positions(model, x, pad, run):
    x = x.clone().requires_grad_(True)
    (out, ref, _) = packed_and_padded(model, lambda m: run(m, x, pad))
    real = ~pad
    torch.testing.assert_close(out[real], ref[real], rtol=1e-9, atol=1e-10)
    assert not out[pad].any(), "a packed stack leaves zeros at padding"
    grad_out = torch.randn_like(out)
    g_packed, = torch.autograd.grad(out[real], x, grad_out[real])
    g_padded, = torch.autograd.grad(ref[real], x, grad_out[real])
    torch.testing.assert_close(g_packed, g_padded, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm, placement", GRID)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_every_norm_and_placement_equals_the_padded_path(norm, placement, kind):
    torch.manual_seed(0)
    stack = (Encoder(config(norm, placement), 2) if kind == "encoder"
             else Decoder(config(norm, placement), 2, cross_attention=False)).double().train()
    pad = ragged_padding()
    x = torch.randn(*pad.shape, D, dtype=torch.float64)
    assert_same_at_real_positions(stack, x, pad, lambda m, x, pad: m(x, padding_mask=pad))


@pytest.mark.parametrize("norm, placement", [("layernorm", "post"), ("rmsnorm", "pre"), ("powernorm", "sandwich"),
                                             ("batchnorm", "pre"), ("layernorm", "resi_dual")])
def test_encoder_decoder_with_cross_attention(norm, placement):
    torch.manual_seed(0)
    model = EncoderDecoder(config(norm, placement), 2, 2, vocab_size=11, max_seq_len=16).double().train()
    src_pad, tgt_pad = ragged_padding(), ragged_padding().flip(1)
    src = torch.randint(0, 11, src_pad.shape)
    tgt = torch.randint(0, 11, tgt_pad.shape)
    out, ref, _ = packed_and_padded(model, lambda m: m(src, tgt, src_padding_mask=src_pad, tgt_padding_mask=tgt_pad))
    torch.testing.assert_close(out[~tgt_pad], ref[~tgt_pad], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_rotary_positions_and_grouped_query_attention(causal):
    """Each real token keeps its column as its rotary position, so left padding matches too."""
    torch.manual_seed(0)
    cfg = config("rmsnorm", "pre", n_kv_heads=1, rope_base=10_000.0, qk_norm="head")
    stack = Decoder(cfg, 2, cross_attention=False, causal=causal, rope=True).double().train()
    pad = ragged_padding()
    x = torch.randn(*pad.shape, D, dtype=torch.float64)
    assert_same_at_real_positions(stack, x, pad, lambda m, x, pad: m(x, padding_mask=pad))


def test_language_model_logits_and_loss_gradient():
    torch.manual_seed(0)
    lm = tformer.LanguageModel(config("layernorm", "pre"), 2, 13, 16, positions="rope").double().train()
    pad = ragged_padding()
    tokens = torch.randint(0, 13, pad.shape)
    out, ref, padded_lm = packed_and_padded(lm, lambda m: m(tokens, padding_mask=pad))
    torch.testing.assert_close(out[~pad], ref[~pad], rtol=1e-9, atol=1e-10)
    targets = torch.randint(0, 13, pad.shape)[~pad]
    nn.functional.cross_entropy(out[~pad], targets).backward()
    nn.functional.cross_entropy(ref[~pad], targets).backward()
    for (name, p), q in zip(lm.named_parameters(), padded_lm.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_xformers_runs_one_block_diagonal_bias_for_the_whole_stack(xformers_reference):
    """On CUDA the packed sequences go to xformers as one (1, tokens) batch with a block-diagonal bias,
    built once per stack call and shared by every layer (here through the CPU reference kernel)."""
    from xformers.ops.fmha import attn_bias as xbias

    torch.manual_seed(0)
    pad = ragged_padding()
    x = torch.randn(*pad.shape, D, dtype=torch.float64)
    for causal, bias_type in ((True, xbias.BlockDiagonalCausalMask), (False, xbias.BlockDiagonalMask)):
        xformers_reference.clear()
        stack = Decoder(config(attention="xformers"), 3, cross_attention=False, causal=causal).double().eval()
        reference = copy.deepcopy(stack)
        for block in reference.layers:
            block.attn.backend = block.attn._attend = tformer.BACKENDS["math"]
        reference.pack_padding = False
        with torch.no_grad():
            out, ref = stack(x, padding_mask=pad), reference(x, padding_mask=pad)
        torch.testing.assert_close(out[~pad], ref[~pad], rtol=1e-9, atol=1e-10)
        assert len(xformers_reference) == 3
        assert all(type(call["bias"]) is bias_type for call in xformers_reference)
        assert len({id(call["bias"]) for call in xformers_reference}) == 1
        assert xformers_reference[0]["q_shape"] == (1, int((~pad).sum()), 2, D // 2)


def test_packing_round_trip_and_layout():
    pad = ragged_padding()
    packing = Packing(pad)
    assert packing.seqlens == [4, 4, 4, 7, 1] and packing.tokens == 20
    assert packing.positions[4:8].tolist() == [3, 4, 5, 6]  # row 1 is left-padded by 3
    x = torch.randn(*pad.shape, 3)
    packed = packing.pack(x)
    assert packed.shape == (1, 20, 3)
    torch.testing.assert_close(packed[0], x[~pad])
    torch.testing.assert_close(packing.unpack(packed), x.masked_fill(pad[..., None], 0.0))


def test_when_a_stack_packs():
    stack = Encoder(config(), 1)
    x = torch.randn(2, 4, D)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    assert stack.packing_for(x, None) is None
    assert stack.packing_for(x, pad) is None  # nothing to drop
    assert stack.packing_for(x, ~pad) is None  # nothing left: the padded path's all-padding rules apply
    pad[0, 2:] = True
    assert isinstance(stack.packing_for(x, pad), Packing)
    stack.pack_padding = False
    assert stack.packing_for(x, pad) is None
    stack.pack_padding = True
    with pytest.raises(ValueError, match=r"padding mask for x must have shape \(batch, seq\) = \(2, 4\)"):
        stack.packing_for(x, pad[:, :3])
    custom = Encoder(config(), 1)
    custom.layers[0].ffn = nn.Sequential(nn.Linear(D, D))  # not known to work token by token
    assert custom.packing_for(x, pad) is None
    custom.layers[0].ffn.tokenwise = True
    assert isinstance(custom.packing_for(x, pad), Packing)


def test_all_padding_rows_and_fully_padded_batches_stay_finite():
    stack = Encoder(config("batchnorm", "post"), 2).double().train()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True
    pad[2, 3:] = True
    out = stack(x, padding_mask=pad)
    assert torch.isfinite(out).all() and not out[1].any()
    assert torch.isfinite(stack(x, padding_mask=torch.ones(3, 5, dtype=torch.bool))).all()


def test_monitor_runs_watched_stacks_padded_and_restores_packing(tmp_path):
    lm = tformer.LanguageModel(config(), 2, 13, 16)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    with TrainingMonitor(lm, opt, every=1, path=tmp_path / "m.jsonl"):
        assert lm.decoder.pack_padding is False
    assert lm.decoder.pack_padding is True


def test_right_padding_needs_no_causal_mask():
    right = torch.tensor([[False, False, True], [False, False, False]])
    left = torch.tensor([[True, False, False], [False, False, False]])
    assert is_right_padded(right) and not is_right_padded(left)
    assert attention_mask(3, 3, causal=True, kv_padding_mask=right, device=right.device) == (None, True)
    mask, is_causal = attention_mask(3, 3, causal=True, kv_padding_mask=left, device=left.device)
    assert not is_causal and mask.shape == (2, 1, 3, 3)
