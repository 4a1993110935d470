"""torch.compile(fullgraph=True): no graph breaks, and the compiled block computes what eager does.

The norm x placement grid compiles each decoder block (causal self-attention, cross-attention, padding)
cold, 5-10 s each on 2 cores: CI (``slow``) compiles a set that meets every norm and every placement, the
rest is marked ``exhaustive``; one decoder block runs by default.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tformer
from conftest import ATTENTION_VARIANTS, GRID, NORMS, PLACEMENTS, covering_pairs, exhaustive_except, quick_norm_options


def compiled_matches_eager(block, x, memory=None, **kwargs):
    """Outputs, input gradients and parameter gradients of the compiled block equal eager's."""
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)  # raises on any graph break
    results = []
    for module in (compiled, block):
        leaves = {"x": x.detach().clone().requires_grad_()}
        if memory is not None:
            leaves["memory"] = memory.detach().clone().requires_grad_()
            kwargs["memory"] = leaves["memory"]
        out = module(leaves["x"], **kwargs)
        out.backward(torch.cos(out.detach()))
        grads = [leaf.grad for leaf in leaves.values()] + [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        results.append((out.detach(), grads))
    (out_c, grads_c), (out_e, grads_e) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    assert len(grads_c) == len(grads_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decoder_block_with_cross_attention_padding_and_causal_mask():
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=32, n_heads=4, d_ff=64, norm="rmsnorm", placement="sandwich", attention="sdpa")
    block = tformer.DecoderBlock(cfg)
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    compiled_matches_eager(block, x, memory, memory_padding_mask=pad)


@pytest.mark.parametrize("norm, placement", exhaustive_except(GRID, covering_pairs(NORMS, PLACEMENTS)))
def test_every_norm_and_placement_compiles_without_graph_breaks(norm, placement):
    """Every registered norm in every registered placement (stack-level ones begin and end their stream
    inside the standalone block) compiles a decoder block with cross-attention and padding, no graph break.
    CI (``slow``) compiles every norm and every placement at least once; the rest of the product is marked
    ``exhaustive`` (cold, each compile takes 5-10 s on 2 cores), and ``benchmarks/run.py`` compiles all of it."""
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=16, n_heads=2, d_ff=32, norm=norm, placement=placement, attention="sdpa",
                              norm_options=quick_norm_options(norm))
    block = tformer.DecoderBlock(cfg)
    x, memory = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    memory_pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    compiled_matches_eager(block, x, memory, padding_mask=pad, memory_padding_mask=memory_pad)


GEMMA_LIKE = dict(norm="rmsnorm", norm_options={"unit_offset": True}, placement="sandwich", activation="geglu_tanh",
                  n_kv_heads=1, head_dim=12, attn_scale=0.25, attn_softcap=5.0, bias=False)


def test_gemma_like_block_compiles():
    """Rotary positions, grouped-query attention, wide heads, soft-capped scores (the math path) and
    (1 + w) RMSNorm in the sandwich placement: no graph break, eager's values and gradients."""
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=32, n_heads=4, d_ff=64, **GEMMA_LIKE)
    block = tformer.DecoderBlock(cfg, cross_attention=False, rope=True)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    compiled_matches_eager(block, torch.randn(2, 6, 32), padding_mask=pad)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_every_attention_variant_compiles(variant, backend):
    """Each attention variant of the test matrix (GQA, both QK-norms, rotary positions, wide scaled heads)
    in a causal decoder block with padding."""
    fields, rope = ATTENTION_VARIANTS[variant]
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=16, n_heads=2, d_ff=32, norm="layernorm", attention=backend, **fields)
    block = tformer.DecoderBlock(cfg, cross_attention=False, rope=rope)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    compiled_matches_eager(block, torch.randn(2, 6, 16), padding_mask=pad)


def test_kernels_availability_is_marked_constant_the_way_torch_marks_it():
    # tformer marks it without importing torch._dynamo (2 s of every import); torch's decorator must set the same
    from tformer import fused_norms, rmsnorm

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    for function in (rmsnorm._kernels_available, fused_norms._kernels_available):
        assert {k: v for k, v in vars(function).items() if not k.startswith("__")} == vars(marked)


def test_import_tformer_does_not_import_dynamo():
    import subprocess
    import sys

    code = "import sys, tformer; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

