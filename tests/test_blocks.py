"""The norm x placement x backend grid: agreement, padding invariance, causality, gradients."""

import copy

import pytest
import torch

import tformer
from conftest import ATTENTION_VARIANTS, CPU_BACKENDS, GRID, PLACEMENTS, causal_in_training, perturb_, quick_norm_options, spread
from tformer import BlockConfig, DecoderBlock, EncoderBlock
from tformer.norms import norm_traits

KINDS = ["encoder", "decoder"]
B, S, M, D = 3, 6, 5, 16


def config(norm, placement, attention="math", **kw):
    return BlockConfig(d_model=D, n_heads=2, d_ff=32, norm=norm, placement=placement,
                       attention=attention, norm_options=quick_norm_options(norm), **kw)


def build(kind, cfg, seed=0, rope=False):
    torch.manual_seed(seed)
    block = EncoderBlock(cfg, rope=rope) if kind == "encoder" else DecoderBlock(cfg, cross_attention=True, rope=rope)
    return perturb_(block).double()  # off the symmetric init (ReZero's 0, norms' 1/0): every path matters


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    memory = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    memory_pad = torch.zeros(B, M, dtype=torch.bool)
    memory_pad[0, 3:] = True
    return x, pad, memory, memory_pad


def run(block, x, pad, memory, memory_pad):
    if isinstance(block, DecoderBlock):
        return block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    return block(x, padding_mask=pad)


@pytest.mark.parametrize("norm, placement, kind, variant", spread([(*c, k) for c in GRID for k in KINDS],
                                                                  list(ATTENTION_VARIANTS)))
def test_backends_agree(norm, placement, kind, variant, xformers_reference):
    """Every backend gives the math backend's outputs, for every norm x placement x kind with one attention
    variant each (MHA, GQA, rotary positions, both QK-norms; rotating), every variant under slow."""
    fields, rope = ATTENTION_VARIANTS[variant]
    x, pad, memory, memory_pad = inputs()
    outputs = {}
    for backend in CPU_BACKENDS:
        block = build(kind, config(norm, placement, backend, **fields), rope=rope)
        outputs[backend] = run(block, x, pad, memory, memory_pad)
    for backend in CPU_BACKENDS[1:]:
        torch.testing.assert_close(outputs[backend][~pad], outputs["math"][~pad], rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm, placement, kind, backend", spread([(*c, k) for c in GRID for k in KINDS], CPU_BACKENDS))
def test_padding_contents_never_reach_real_positions(norm, placement, kind, backend, xformers_reference):
    """Every norm x placement x block kind on one backend (rotating) by default; x every backend under slow."""
    x, pad, memory, memory_pad = inputs()
    block = build(kind, config(norm, placement, backend))
    twin = copy.deepcopy(block)  # PowerNorm's statistics move with each training-mode call
    x2 = torch.where(pad[..., None], torch.randn_like(x) * 50, x)
    memory2 = torch.where(memory_pad[..., None], torch.randn_like(memory) * 50, memory)
    y1 = run(block, x, pad, memory, memory_pad)
    y2 = run(twin, x2, pad, memory2, memory_pad)
    torch.testing.assert_close(y1[~pad], y2[~pad], rtol=0, atol=1e-10)
    for (name, a), b in zip(block.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm, placement", GRID)
def test_decoder_never_sees_the_future(norm, placement, mode):
    """Eval mode for every norm; in training mode batch statistics (PowerNorm's) mix all positions
    (by design: the authors use it in encoders), so only norms without them are causal there."""
    if mode == "train" and not causal_in_training(norm):
        pytest.skip(f"{norm}: training-mode batch statistics span all positions (uses_batch_statistics)")
    torch.manual_seed(0)
    block = DecoderBlock(config(norm, placement, "sdpa"), cross_attention=False).double()
    block.train(mode == "train")
    x, *_ = inputs()
    t = 3
    x_future = x.clone()
    x_future[:, t + 1 :] = torch.randn_like(x_future[:, t + 1 :]) * 10
    twin = copy.deepcopy(block)
    torch.testing.assert_close(block(x)[:, : t + 1], twin(x_future)[:, : t + 1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm, placement", GRID)
def test_gradients_reach_every_parameter(norm, placement, kind):
    x, pad, memory, memory_pad = inputs()
    block = build(kind, config(norm, placement, "sdpa"))
    x.requires_grad_(True)
    memory.requires_grad_(True)
    y = run(block, x, pad, memory, memory_pad)
    (y[~pad] * torch.randn_like(y[~pad])).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    if kind == "decoder":
        assert memory.grad[~memory_pad].abs().sum() > 0


@pytest.mark.parametrize("norm, placement", [(n, p) for n, p in GRID if norm_traits(n).exact_gradient])
def test_block_gradcheck(norm, placement):
    """Exact float64 gradients through whole decoder blocks, for every norm whose backward is exact
    (``exact_gradient``; PowerNorm's is approximate by design)."""
    torch.manual_seed(0)
    block = build("decoder", BlockConfig(d_model=4, n_heads=2, d_ff=8, norm=norm, placement=placement, attention="math",
                                         norm_options=quick_norm_options(norm)))
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, False, False], [False, False, True]])
    assert torch.autograd.gradcheck(lambda x, m: block(x, padding_mask=pad, memory=m)[~pad], (x, memory),
                                    fast_mode=True)  # random projections of the Jacobian, both sides


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_residual_sublayer_names(placement):
    cfg = config("layernorm", placement)
    assert list(EncoderBlock(cfg).residual_sublayers()) == ["attn", "ffn"]
    assert list(DecoderBlock(cfg).residual_sublayers()) == ["attn", "cross_attn", "ffn"]
    assert list(DecoderBlock(cfg, cross_attention=False).residual_sublayers()) == ["attn", "ffn"]


def test_decoder_memory_errors():
    with pytest.raises(ValueError, match="needs `memory`"):
        DecoderBlock(config("layernorm", "pre"))(torch.randn(1, 2, D))
    with pytest.raises(ValueError, match="cross_attention=False"):
        DecoderBlock(config("layernorm", "pre"), cross_attention=False)(torch.randn(1, 2, D), memory=torch.randn(1, 2, D))


@pytest.mark.parametrize("activation", list(tformer.ACTIVATIONS))
def test_activations(activation):
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=12, activation=activation)
    block = EncoderBlock(cfg)
    assert (block.ffn.w3 is not None) == tformer.ACTIVATIONS[activation].gated
    x = torch.randn(2, 3, D)
    hidden = tformer.ACTIVATIONS[activation].fn(block.ffn.w1(x))
    if block.ffn.w3 is not None:
        hidden = hidden * block.ffn.w3(x)
    torch.testing.assert_close(block.ffn(x), block.ffn.w2(hidden))


def test_swiglu_is_silu_gate():
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=12, activation="swiglu")
    ffn = EncoderBlock(cfg).ffn
    x = torch.randn(2, 3, D)
    expected = ffn.w2(torch.nn.functional.silu(ffn.w1(x)) * ffn.w3(x))
    torch.testing.assert_close(ffn(x), expected)


def test_qk_norm_normalizes_queries_and_keys_per_head():
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=32, qk_norm=True, attention="math")
    attn = EncoderBlock(cfg).attn.double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    q, k, v = (t.reshape(2, 4, 2, D // 2) for t in attn.qkv(x).chunk(3, -1))

    def rms(t, w):
        return w * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (D // 2) ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 4, D)
    torch.testing.assert_close(attn(x), attn.out(out))


def test_attention_dropout_only_in_training():
    cfg = BlockConfig(d_model=D, n_heads=2, d_ff=32, attn_dropout=0.5, attention="sdpa")
    block = EncoderBlock(cfg)
    x = torch.randn(2, 8, D)
    assert not torch.allclose(block(x), block(x))
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_input_validation():
    block = DecoderBlock(config("layernorm", "pre"))
    x, memory = torch.randn(2, 3, D), torch.randn(2, 4, D)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, 16\), got \(2, 3, 8\)"):
        block(torch.randn(2, 3, 8), memory=memory)
    with pytest.raises(TypeError, match="bool tensor"):
        block(x, padding_mask=torch.zeros(2, 3, dtype=torch.long), memory=memory)
    with pytest.raises(ValueError, match=r"mask for x must have shape \(batch, seq\) = \(2, 3\), got \(3, 2\)"):
        block(x, padding_mask=torch.zeros(3, 2, dtype=torch.bool), memory=memory)
    with pytest.raises(ValueError, match=r"mask for memory"):
        block(x, memory=memory, memory_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("norm, placement", GRID)
def test_every_combination_trains(norm, placement):
    """A one-layer seq2seq pair learns to copy: every norm x placement lowers its loss."""
    torch.manual_seed(0)
    cfg = config(norm, placement, "sdpa")
    model = tformer.EncoderDecoder(cfg, 1, 1, vocab_size=8, max_seq_len=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    src = torch.randint(1, 8, (8, 6))
    tgt_in = torch.cat([torch.zeros(8, 1, dtype=torch.long), src[:, :-1]], 1)
    losses = []
    for _ in range(25):
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 8), src.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
