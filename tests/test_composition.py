"""Composition: a user's own attention module and own norm run inside every registered placement.

The modules here are written in the test, against the call signatures the blocks document
(``attn(x, padding_mask=...)``, ``cross_attn(x, memory=..., memory_padding_mask=...)``, ``ffn(x)``,
``norm(x, padding_mask=None)``), and are not registered anywhere.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tformer
from conftest import PLACEMENTS, padded_pair, perturb_
from tformer import BlockConfig, CheckpointError, ConfigError, Decoder, DecoderBlock, Encoder, EncoderBlock, LayerContext

D = 8


class MyNorm(nn.Module):
    """A hand-written norm with statistics over the batch's real tokens: each channel divided by its RMS
    over every non-padding token. Padding contents reach the real positions unless every caller passes the
    padding mask, so it checks that each placement (and stack) hands the mask to its norms."""

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x, padding_mask=None):
        squares = x.pow(2).flatten(0, -2)
        if padding_mask is not None:
            keep = ~padding_mask.flatten()
            squares = squares[keep]
        return x * torch.rsqrt(squares.mean(0) + 1e-5) * self.weight + self.bias


class MyAttention(nn.Module):
    """Single-head attention on ``F.scaled_dot_product_attention``: self-attention (causal or not) or
    cross-attention to ``memory``. Padding keys are masked; a query may always see itself (no empty rows)."""

    def __init__(self, d_model: int, *, causal: bool = False, cross: bool = False):
        super().__init__()
        self.d_model, self.causal, self.cross = d_model, causal, cross
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, *, padding_mask=None, memory=None, memory_padding_mask=None):
        source, source_padding = (memory, memory_padding_mask) if self.cross else (x, padding_mask)
        q = self.q(x)
        k, v = self.kv(source).chunk(2, dim=-1)
        visible = torch.ones(x.shape[0], x.shape[1], source.shape[1], dtype=torch.bool)
        if source_padding is not None:
            visible = visible & ~source_padding[:, None, :]
        if not self.cross:
            if self.causal:
                visible = visible & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            visible = visible | torch.eye(x.shape[1], dtype=torch.bool)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=visible))


#: Norms given to BlockConfig(norm=...) without registering: a hand-written class, torch's class (its forward takes
#: only x, so the block adapts it), and a callable ``(d_model) -> module``.
NORM_CLASSES = {"MyNorm": MyNorm, "torch.nn.LayerNorm": nn.LayerNorm,
                "partial(torch.nn.RMSNorm)": functools.partial(nn.RMSNorm, eps=1e-6)}
KINDS = ["encoder", "decoder"]


def config(norm, placement):
    return BlockConfig(d_model=D, n_heads=2, d_ff=16, norm=norm, placement=placement, attention="sdpa")


def inputs():
    return padded_pair(D)


def check_composed(model, call, custom_modules):
    """``call(model, x, pad, memory, memory_pad)`` with padding: finite everywhere, real positions independent
    of the padding contents, and gradients reaching every parameter, those of ``custom_modules`` included."""
    perturb_(model)  # off the symmetric init: ReZero's 0 would stop the gradient to the branches
    model.double()
    twin = copy.deepcopy(model)
    x, pad, memory, memory_pad = inputs()
    y = call(model, x, pad, memory, memory_pad)
    assert y.shape == x.shape and torch.isfinite(y).all()
    noisy_x = torch.where(pad[..., None], torch.randn_like(x) * 50, x)
    noisy_memory = torch.where(memory_pad[..., None], torch.randn_like(memory) * 50, memory)
    torch.testing.assert_close(call(twin, noisy_x, pad, noisy_memory, memory_pad)[~pad], y[~pad], rtol=0, atol=1e-10)
    (y[~pad] * torch.randn_like(y[~pad])).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    custom_params = [p for m in custom_modules for p in m.parameters()]
    assert custom_params and all(p.grad is not None for p in custom_params)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(id(p) in names for p in custom_params)  # registered inside the model, so trained with it


def norms_in(model, norm):
    cls = norm.func if isinstance(norm, functools.partial) else norm
    return [m for m in model.modules() if isinstance(m, cls)]


def run_block(block, x, pad, memory, memory_pad):
    if isinstance(block, DecoderBlock):
        return block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    return block(x, padding_mask=pad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", list(NORM_CLASSES))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_custom_attention_and_norm_in_every_placement(placement, norm, kind):
    cfg = config(NORM_CLASSES[norm], placement)
    if kind == "encoder":
        attns = [MyAttention(D)]
        block = EncoderBlock(cfg, attn=attns[0])
    else:
        attns = [MyAttention(D, causal=True), MyAttention(D, cross=True)]
        block = DecoderBlock(cfg, cross_attention=True, attn=attns[0], cross_attn=attns[1])
    assert block.attn is attns[0]
    assert set(block.built_parts) == {"ffn"} | {f"{n}_residual" for n in block.sublayer_names}
    check_composed(block, run_block, attns + norms_in(block, NORM_CLASSES[norm]))


def run_stacks(stacks, x, pad, memory, memory_pad):
    encoder, decoder = stacks
    encoded = encoder(memory, padding_mask=memory_pad)
    return decoder(x, padding_mask=pad, memory=encoded, memory_padding_mask=memory_pad)


@pytest.mark.parametrize("norm", list(NORM_CLASSES))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_custom_attention_and_norm_in_two_layer_stacks(placement, norm):
    """An Encoder feeding a Decoder (2 layers each, the custom norm also as their final norm where the
    placement needs one), each block's attention replaced by the custom module."""
    cfg = config(NORM_CLASSES[norm], placement)
    encoder, decoder = Encoder(cfg, 2, n_decoder_layers=2), Decoder(cfg, 2, n_encoder_layers=2)
    attns = []
    for block in encoder.layers:
        block.attn = MyAttention(D)
        attns.append(block.attn)
    for block in decoder.layers:
        block.attn, block.cross_attn = MyAttention(D, causal=True), MyAttention(D, cross=True)
        attns += [block.attn, block.cross_attn]
    stacks = nn.ModuleList([encoder, decoder])
    check_composed(stacks, run_stacks, attns + norms_in(stacks, NORM_CLASSES[norm]))


class MyFeedForward(nn.Sequential):
    def __init__(self, d_model: int):
        super().__init__(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_block_from_parts_only(placement, kind):
    """No BlockConfig: every part passed in, the placements built from the registry with the custom norm."""
    layer = LayerContext(kind)

    def residual():
        return tformer.PLACEMENTS[placement](lambda: MyNorm(D), layer, 0.0)

    if kind == "encoder":
        parts = dict(attn=MyAttention(D), ffn=MyFeedForward(D), attn_residual=residual(), ffn_residual=residual())
        block = EncoderBlock(**parts, layer=layer)
    else:
        parts = dict(attn=MyAttention(D, causal=True), cross_attn=MyAttention(D, cross=True), ffn=MyFeedForward(D),
                     attn_residual=residual(), cross_attn_residual=residual(), ffn_residual=residual())
        block = DecoderBlock(**parts, layer=layer)
    assert block.cfg is None and block.built_parts == () and block.spec is None
    assert all(getattr(block, name) is part for name, part in parts.items())
    check_composed(block, run_block, list(parts.values()))


def test_block_from_parts_needs_every_part_or_a_config():
    with pytest.raises(ConfigError, match="missing: .*ffn"):
        EncoderBlock(attn=MyAttention(D))
    with pytest.raises(ConfigError, match="causal"):
        DecoderBlock(config("layernorm", "pre"), attn=MyAttention(D, causal=False))


def _mark_(module: nn.Module) -> dict:
    """Fill every parameter with a recognizable pattern (no init scheme produces it); return a copy."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.linspace(-0.3, 0.7, p.numel()).reshape(p.shape) + i)
    return copy.deepcopy(module.state_dict())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_parts_passed_in_keep_their_weights(placement, kind):
    """The block initializes only the parts it builds (with the placement's branch init): a part passed in,
    a tformer module with a ``reset_parameters(branch)`` included, keeps its weights."""
    cfg = config("layernorm", placement)
    layer = LayerContext(kind)
    given = {"attn": tformer.attention.MultiHeadAttention.from_config(cfg, causal=kind == "decoder"),
             "ffn": tformer.feedforward.FeedForward.from_config(cfg),
             "attn_residual": tformer.PLACEMENTS[placement](cfg.norm_factory(), layer, 0.0)}
    if kind == "decoder":
        given["cross_attn"] = MyAttention(D, cross=True)
    before = {name: _mark_(part) for name, part in given.items()}
    block = (EncoderBlock if kind == "encoder" else DecoderBlock)(cfg, **given, layer=layer)
    for name, part in given.items():
        assert getattr(block, name) is part
        for key, value in part.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key}"
    assert set(block.built_parts) == {f"{n}_residual" for n in block.sublayer_names} - {"attn_residual"}


@pytest.mark.parametrize("norm", list(NORM_CLASSES))
def test_saving_a_model_with_an_unregistered_norm_asks_to_register_it(norm, tmp_path):
    cfg = config(NORM_CLASSES[norm], "pre")
    for model in (tformer.LanguageModel(cfg, 2, 11, 8), Encoder(cfg, 2), DecoderBlock(cfg)):
        with pytest.raises(CheckpointError, match="register"):
            tformer.save(model, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_saving_unregistered_placement_or_parts_says_why(tmp_path):
    cfg = config("layernorm", tformer.hyper_connections(2, dynamic=False))
    with pytest.raises(CheckpointError, match="register"):
        tformer.save(Encoder(cfg, 2), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="parts"):
        tformer.save(EncoderBlock(config("layernorm", "pre"), attn=MyAttention(D)), tmp_path / "model.safetensors")


def test_analysis_sees_the_gains_of_wrapped_torch_norms_and_skips_custom_ffn_names():
    """norm=nn.LayerNorm is wrapped (its forward takes only x); gradient_scales still reports its gain."""
    torch.manual_seed(0)
    model = tformer.LanguageModel(tformer.BlockConfig(d_model=8, n_heads=2, d_ff=16, norm=nn.LayerNorm), 1, 11, 8)
    model.decoder.layers[0].ffn = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # no w1/w2: no FFN rows, no error
    rows = tformer.analysis.gradient_scales(model, torch.randint(0, 11, (2, 6)), lambda m, b: m(b).logsumexp(-1).mean())
    params = [r["param"] for r in rows]
    assert "attn_residual.norm" in params and "ffn_residual.norm" in params
    assert not any(p.startswith("ffn.w") for p in params)
