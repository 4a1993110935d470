"""Stack-level placements (ResiDual, hyper-connections) against hand-written computations of their formulas."""

import pytest
import torch
import torch.nn.functional as F

import tformer
from tformer import BlockConfig, Decoder, Encoder, LanguageModel
from tformer.data import LMBatches, corpus_splits
from tformer.errors import ConfigError
from tformer.stack_placements import DualStream, HyperStreams, hyper_connections
from tformer.study import unigram_entropy

D = 8


def _randomized(module, scale=0.3, seed=0):
    """Move every parameter off its init (incl. the zero-initialized dynamic weights) so every term matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.double()


def _inputs(batch=3, seq=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 4:] = True
    return x, pad


def _sublayers(block, pad, memory=None, memory_pad=None):
    """``(F, norm)`` per sublayer in forward order: the block's own modules, called directly."""
    calls = [lambda h: block.attn(h, padding_mask=pad)]
    if getattr(block, "has_cross_attention", False):
        calls.append(lambda h: block.cross_attn(h, memory=memory, memory_padding_mask=memory_pad))
    calls.append(block.ffn)
    return list(zip(calls, [placement for _, placement in block.residual_sublayers().values()]))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "powernorm"])
def test_resi_dual_stack_matches_its_formula(norm):
    """x_a <- Norm(x_a + F(x_a)); x_d <- x_d + F(x_a), both from x; output x_a + Norm_final(x_d)."""
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=16, norm=norm, placement="resi_dual", attention="math")
    encoder = _randomized(Encoder(cfg, 3)).eval()
    x, pad = _inputs()
    x_a, x_d = x, x
    for block in encoder.layers:
        for f, placement in _sublayers(block, pad):
            branch = f(x_a)
            x_a, x_d = placement.norm(x_a + branch, pad), x_d + branch
    expected = x_a + encoder.final_norm(x_d, pad)
    torch.testing.assert_close(encoder(x, padding_mask=pad)[~pad], expected[~pad], rtol=0, atol=1e-12)


def _hyper_by_hand(placement, streams, f, pad):
    """One hyper-connection step written with explicit loops over the streams."""
    n = placement.n_streams
    width, depth, out = placement.width, placement.depth, placement.out
    if placement.dynamic:
        b, s = streams.shape[:2]
        normed = placement.coeff_norm(streams.reshape(b, s * n, D), pad.repeat_interleave(n, dim=1)).reshape(b, s, n, D)
        width = width + placement.width_scale * torch.tanh(normed @ placement.width_fn)
        depth = depth + placement.width_scale * torch.tanh(normed @ placement.depth_fn)
        out = out + placement.out_scale * torch.tanh(normed @ placement.out_fn)
    else:
        width, depth, out = (t.expand(*streams.shape[:2], *t.shape) for t in (width, depth, out))
    h = sum(width[..., i, None] * streams[..., i, :] for i in range(n))
    y = f(placement.norm(h, pad))
    new = [out[..., j, None] * y + sum(depth[..., i, j, None] * streams[..., i, :] for i in range(n)) for j in range(n)]
    return torch.stack(new, dim=-2)


@pytest.mark.parametrize("placement", ["hyper", hyper_connections(2, dynamic=False), hyper_connections(3)])
def test_hyper_connections_stack_matches_its_formula(placement):
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=16, norm="rmsnorm", placement=placement, attention="math")
    decoder = _randomized(Decoder(cfg, 2, cross_attention=True)).eval()
    x, pad = _inputs()
    memory, memory_pad = _inputs(seq=4, seed=2)
    n = decoder.layers[0].attn_residual.n_streams
    streams = x[..., None, :].expand(*x.shape[:2], n, D)
    for block in decoder.layers:
        for f, p in _sublayers(block, pad, memory, memory_pad):
            streams = _hyper_by_hand(p, streams, f, pad)
    expected = decoder.final_norm(streams.sum(-2), pad)
    got = decoder(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    torch.testing.assert_close(got[~pad], expected[~pad], rtol=0, atol=1e-12)


def test_hyper_connections_start_as_pre_ln():
    """At init (equal streams, a_m one-hot, a_r = I, b = 1, zero dynamic weights) the streams stay equal and
    each follows Pre-LN exactly, so the output is Norm(n * x_pre)."""
    torch.manual_seed(0)
    pre = Encoder(BlockConfig(d_model=D, n_heads=2, d_ff=16, norm="rmsnorm", placement="pre", attention="math"), 2)
    torch.manual_seed(0)
    hyper = Encoder(BlockConfig(d_model=D, n_heads=2, d_ff=16, norm="rmsnorm", placement="hyper", attention="math"), 2)
    hyper.load_state_dict(pre.state_dict(), strict=False)  # same attention/ffn weights; norms are all ones
    x, pad = _inputs()
    x = x.float()
    # RMSNorm is scale-invariant up to eps: Norm(4 h) ~= Norm(h)
    torch.testing.assert_close(hyper(x, padding_mask=pad)[~pad], pre(x, padding_mask=pad)[~pad], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement", ["resi_dual", "hyper"])
def test_block_alone_begins_and_ends_its_stream(placement):
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=16, placement=placement, attention="math")
    block = _randomized(tformer.EncoderBlock(cfg))
    x, pad = _inputs()
    stream = block(block.begin(x), padding_mask=pad)
    assert isinstance(stream, (DualStream, HyperStreams))
    torch.testing.assert_close(block(x, padding_mask=pad), block.end(stream, None, pad))


def test_stack_level_placements_cannot_mix_with_others():
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=16)
    with pytest.raises(ConfigError, match="different residual streams"):
        Encoder(cfg, 2, placements=["resi_dual", "pre"])
    with pytest.raises(ConfigError, match="different residual streams"):
        Decoder(cfg, 2, placements=["hyper", "resi_dual"])
    Encoder(cfg, 2, placements=["post", "pre"])  # one-tensor placements mix freely


@pytest.mark.parametrize("placement", ["resi_dual", "hyper"])
def test_padding_and_kv_cache(placement):
    """Real positions ignore padding contents; incremental decoding equals the full forward pass."""
    torch.manual_seed(0)
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=16, norm="layernorm", placement=placement, attention="sdpa")
    lm = _randomized(LanguageModel(cfg, 2, 11, 16)).eval()
    tokens = torch.randint(0, 11, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    other = tokens.clone()
    other[0, 5:] = (other[0, 5:] + 3) % 11
    torch.testing.assert_close(lm(tokens, padding_mask=pad)[~pad], lm(other, padding_mask=pad)[~pad], rtol=0, atol=1e-12)
    full = lm(tokens)
    cache = lm.new_cache()
    steps = [lm(tokens[:, :3], cache=cache)] + [lm(tokens[:, i : i + 1], cache=cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("placement", ["resi_dual", "hyper"])
def test_trains_on_the_embedded_corpus(placement):
    """100 AdamW steps of a tiny byte LM take the validation loss well below the unigram entropy."""
    torch.manual_seed(0)
    train, val = corpus_splits()
    cfg = BlockConfig(d_model=32, n_heads=2, d_ff=64, placement=placement, attention="sdpa")
    lm = LanguageModel(cfg, 2, 256, 64)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    batches = LMBatches(train, 16, 64, seed=0)
    for step in range(100):
        inputs, targets = batches.batch(step)
        loss = F.cross_entropy(lm(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval()
    windows = val[: 16 * 65].reshape(16, 65)
    with torch.no_grad():
        val_loss = F.cross_entropy(lm(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()
    assert val_loss < unigram_entropy() - 0.3, val_loss
