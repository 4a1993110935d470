"""The registered axes as a matrix, at stack level: every norm x every placement (stack-level ones included).

Block-level checks of the grid are in ``test_blocks.py``; here whole encoder and decoder stacks run,
so a stack-level placement's stream goes from block to block and through ``end``. The declared traits
of every norm are checked against what the norm does, since the other tests rely on them.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tformer
from conftest import (ATTENTION_VARIANTS, CPU_BACKENDS, padded_pair, GRID, NORMS, PLACEMENTS, causal_in_training, covering_pairs, perturb_,
                      quick_norm_options, spread, stack_depth)
from tformer import BlockConfig, Decoder, Encoder, EncoderDecoder
from tformer.checkpoint import model_description
from tformer.norms import norm_traits

D = 8


def config(norm, placement, **kw):
    return BlockConfig(d_model=D, n_heads=2, d_ff=16, norm=norm, placement=placement, attention="sdpa",
                       norm_options=quick_norm_options(norm), **kw)


@pytest.mark.parametrize("combinations, values", [
    (GRID, [f"{p}/{v}" for p in tformer.POSITIONS for v in ATTENTION_VARIANTS]),  # test_generate
    ([(n, p, k) for n, p in GRID for k in ("encoder", "decoder")], list(ATTENTION_VARIANTS)),  # test_backends_agree
    ([(n, p, k) for n, p in GRID for k in ("encoder", "decoder")], CPU_BACKENDS),  # test_blocks
], ids=["grid-positions-attention", "grid-kinds-attention", "grid-kinds-backends"])
def test_default_run_meets_every_value_on_every_axis(combinations, values):
    """Where the full product is slow, the default run still pairs each entry of each axis with each value
    (with as many values as it can where an entry has fewer combinations than there are values)."""
    params = spread(combinations, values)
    assert len(params) == len(combinations) * len(values)
    fast = [p.values for p in params if not p.marks]
    assert len(fast) == len(combinations)
    assert {f[-1] for f in fast} == set(values)
    for axis in range(len(combinations[0])):
        for entry in {c[axis] for c in combinations}:
            met = {f[-1] for f in fast if f[axis] == entry}
            n_combinations = sum(c[axis] == entry for c in combinations)
            assert len(met) == min(len(values), n_combinations), (axis, entry, met)
    pairs = covering_pairs(NORMS, PLACEMENTS)
    assert {n for n, _ in pairs} == set(NORMS) and {p for _, p in pairs} == set(PLACEMENTS)


def _norm(name):
    """The norm ``name`` as a block builds it (block defaults such as PowerNorm's groups included), float64."""
    return config(name, "pre").norm_factory()().double()


@pytest.mark.parametrize("norm", NORMS)
def test_declared_traits_match_what_the_norm_does(norm):
    """Each trait a norm declares (``norm_traits``) is what it does in training mode, so the tests that read
    traits instead of names (causality skips, gradcheck selection, padding) test a new norm correctly."""
    traits = norm_traits(norm)
    module = _norm(norm).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, D, generator=g, dtype=torch.float64) + 0.5

    def fresh(inputs, **kwargs):  # a new copy per call: running statistics move with every training call
        return copy.deepcopy(module)(inputs, **kwargs)

    y = fresh(x)
    other_example = x.clone()
    other_example[1] = torch.randn(5, D, generator=g, dtype=torch.float64) * 3
    mixes_examples = not torch.allclose(fresh(other_example)[0], y[0], rtol=0, atol=1e-12)
    assert mixes_examples == traits.uses_batch_statistics

    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 2:] = pad[2, 4:] = True
    reads_mask = not torch.allclose(fresh(x, padding_mask=pad)[~pad], y[~pad], rtol=0, atol=1e-12)
    assert reads_mask == traits.needs_padding_mask

    scale_invariant = torch.allclose(fresh(x * 10), y, rtol=1e-3, atol=1e-3)
    assert scale_invariant == traits.normalizes

    leaf = x[:2, :3].clone().requires_grad_()
    exact = torch.autograd.gradcheck(fresh, (leaf,), raise_exception=False)  # a pure function of its input
    assert exact == traits.exact_gradient


def _stacks(norm, placement):
    depth = stack_depth(placement)
    cfg = config(norm, placement)
    torch.manual_seed(0)
    encoder = perturb_(Encoder(cfg, depth, n_decoder_layers=depth)).double()
    decoder = perturb_(Decoder(cfg, depth, n_encoder_layers=depth)).double()
    return encoder, decoder


def _inputs():
    return padded_pair(D)  # (src, src_pad, tgt, tgt_pad)


def _run(encoder, decoder, src, src_pad, tgt, tgt_pad):
    memory = encoder(src, padding_mask=src_pad)
    return decoder(tgt, padding_mask=tgt_pad, memory=memory, memory_padding_mask=src_pad)


@pytest.mark.parametrize("norm, placement", GRID)
def test_stacks_padding_causality_and_gradients(norm, placement):
    """An encoder stack feeding a decoder stack with cross-attention, both padded: finite everywhere; real
    positions and every running statistic independent of padding contents; the decoder causal (in eval
    mode, and in training mode for norms without batch statistics); every parameter gets a gradient."""
    encoder, decoder = _stacks(norm, placement)
    src, src_pad, tgt, tgt_pad = _inputs()
    twins = copy.deepcopy((encoder, decoder))
    y = _run(encoder, decoder, src, src_pad, tgt, tgt_pad)
    assert torch.isfinite(y).all()
    noisy_src = torch.where(src_pad[..., None], torch.randn_like(src) * 50, src)
    noisy_tgt = torch.where(tgt_pad[..., None], torch.randn_like(tgt) * 50, tgt)
    y_noisy = _run(*twins, noisy_src, src_pad, noisy_tgt, tgt_pad)
    torch.testing.assert_close(y_noisy[~tgt_pad], y[~tgt_pad], rtol=0, atol=1e-10)
    for a, b in zip((encoder, decoder), twins):
        for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(s, t, rtol=0, atol=1e-10, msg=name)

    params = [*encoder.parameters(), *decoder.parameters()]
    (y[~tgt_pad] * torch.randn_like(y[~tgt_pad])).sum().backward()
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()] + [f"decoder.{n}" for n, _ in decoder.named_parameters()]
    for name, p in zip(names, params):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    future = tgt.clone()
    future[:, 3:] = torch.randn_like(future[:, 3:]) * 10
    for mode in ["eval", "train"] if causal_in_training(norm) else ["eval"]:
        encoder.train(mode == "train")
        decoder.train(mode == "train")
        models = copy.deepcopy((encoder, decoder))
        past = _run(encoder, decoder, src, src_pad, tgt, None)[:, :3]
        torch.testing.assert_close(_run(*models, src, src_pad, future, None)[:, :3], past, rtol=0, atol=1e-10,
                                   msg=f"the decoder sees the future in {mode} mode")


@pytest.mark.parametrize("norm, placement", GRID)
def test_checkpoint_round_trip(norm, placement, tmp_path):
    """Save and load an encoder-decoder after a training step (weights and running statistics moved):
    same class and description, bitwise-equal state, equal outputs."""
    depth = stack_depth(placement)
    torch.manual_seed(0)
    model = EncoderDecoder(config(norm, placement), depth, depth, vocab_size=11, max_seq_len=8)
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 5), generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # bounded steps, also for norm-free models
    for _ in range(3):  # past PowerNorm-style warmups (quick_norm_options), so the running statistics matter
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(src, tgt).flatten(0, 1), tgt.flatten()).backward()
        optimizer.step()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    loaded = tformer.load(tformer.save(model, tmp_path / "model.safetensors"))
    assert type(loaded) is EncoderDecoder and model_description(loaded) == model_description(model)
    state = model.state_dict()
    assert list(loaded.state_dict()) == list(state)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    torch.testing.assert_close(loaded(src, tgt), model.eval()(src, tgt), rtol=0, atol=0)
