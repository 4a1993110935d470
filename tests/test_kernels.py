"""The C RMSNorm kernel (tformer.kernels) and the routes ``rms_norm`` chooses between."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tformer import kernels
from tformer.norms import RMSNormFunction, rms_norm

needs_kernels = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A private cache directory and a forgotten load state; restored afterwards."""
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    kernels._reset()
    yield tmp_path
    monkeypatch.undo()
    kernels._reset()


def reference(x, weight, eps, grad):
    """torch's composite F.rms_norm, in float64, as the independent computation."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y = F.rms_norm(x64, (x.shape[-1],), w64, eps)
    y.backward(grad.double())
    return y.detach(), x64.grad, w64.grad


def run(fn, x, weight, eps, grad):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = fn(x, weight, eps)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad


ROUTES = {
    "kernel": lambda x, w, eps: rms_norm(x, w, eps),
    "layernorm-backward": lambda x, w, eps: RMSNormFunction.apply(x, w, eps),
}
SHAPES = [(3, 7, 64), (5, 13), (2, 3, 4, 33), (1, 1, 1), (64, 1024), (4, 0, 8)]


@needs_kernels
def test_kernels_build_and_load_here():
    status = kernels.status()
    assert status.available, status.reason
    assert status.path and os.path.exists(status.path)
    assert "in use" in str(status)


@needs_kernels
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_torch(route, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    got = run(ROUTES[route], x, weight, 1e-5, grad)
    want = reference(x, weight, 1e-5, grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, **tol)


@needs_kernels
def test_kernel_is_what_rms_norm_runs_on_cpu_float32():
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = rms_norm(x, torch.ones(8), 1e-5)
    assert type(y.grad_fn).__name__ == "_KernelFunctionBackward"


@needs_kernels
@pytest.mark.parametrize("route", ROUTES)
def test_gradcheck_float64(route):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ROUTES[route](a, b, 1e-5), (x, weight))


@needs_kernels
def test_same_result_on_one_thread_and_many():
    """The weight gradient is summed over per-thread partial rows; the split must not matter."""
    torch.manual_seed(0)
    x, grad = torch.randn(96, 512, dtype=torch.float64), torch.randn(96, 512, dtype=torch.float64)
    weight = torch.randn(512, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(rms_norm, x, weight, 1e-6, grad)
        torch.set_num_threads(max(2, threads))
        many = run(rms_norm, x, weight, 1e-6, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@needs_kernels
def test_non_contiguous_input_and_gradient():
    torch.manual_seed(0)
    base = torch.randn(16, 4, 3)
    x = base.transpose(0, 2)  # (3, 4, 16), not contiguous
    weight = torch.randn(16)
    grad = torch.randn(16, 3, 4).permute(1, 2, 0)
    for g, w in zip(run(rms_norm, x, weight, 1e-5, grad), reference(x, weight, 1e-5, grad)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_half_inputs_take_the_layernorm_route_with_fp32_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 32) * 50  # squares overflow nothing in fp32, lose digits in bf16
    weight = torch.randn(32)
    grad = torch.randn(4, 9, 32)
    y, gx, gw = run(rms_norm, x.bfloat16(), weight, 1e-5, grad.bfloat16())
    assert y.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    want = reference(x.bfloat16().float(), weight, 1e-5, grad.bfloat16().float())
    torch.testing.assert_close(y.double(), want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.double(), want[1], rtol=3e-2, atol=3e-2 * want[1].abs().max().item())
    torch.testing.assert_close(gw.double(), want[2], rtol=2e-2, atol=2e-2 * want[2].abs().max().item())


def test_switched_off_by_the_environment(fresh_kernels, monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    status = kernels.status()
    assert not status.available and kernels.ENV_SWITCH in status.reason
    x, weight, grad = torch.randn(3, 16), torch.randn(16), torch.randn(3, 16)
    y = rms_norm(x.requires_grad_(), weight, 1e-5)
    assert "RMSNormFunction" in type(y.grad_fn).__name__
    for g, w in zip(run(rms_norm, x, weight, 1e-5, grad), reference(x, weight, 1e-5, grad)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not in use"):
        kernels.rms_norm_forward(x.detach(), weight, 1e-5)


@pytest.mark.parametrize("compiler, reason", [("/nonexistent/cc", "does not run"), ("false", "building")])
def test_a_broken_compiler_falls_back_and_says_why(fresh_kernels, monkeypatch, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    status = kernels.status()
    assert not status.available and reason in status.reason
    x = torch.randn(2, 8)
    torch.testing.assert_close(rms_norm(x, torch.ones(8), 1e-5), F.rms_norm(x, (8,), None, 1e-5))


@needs_kernels
def test_compiler_command_with_arguments(fresh_kernels, monkeypatch):
    """CC may be a command line ("ccache gcc", "gcc -m64"), as in make."""
    monkeypatch.setenv("CC", f"{kernels._compiler()[0]} -DTFORMER_UNUSED_DEFINE=1")
    assert kernels.status().available, kernels.status().reason


@needs_kernels
def test_built_once_then_loaded_from_the_cache(fresh_kernels):
    first = kernels.status()
    assert first.available and first.reason == "built" and first.path.startswith(str(fresh_kernels))
    stamp = os.stat(first.path).st_mtime_ns
    kernels._reset()
    second = kernels.status()
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == stamp
    assert second.reason == "loaded from the cache"
    assert [p.name for p in fresh_kernels.iterdir()] == [os.path.basename(first.path)]  # no temporaries


@needs_kernels
def test_kernel_functions_reject_what_they_cannot_take():
    with pytest.raises(ValueError, match="float32/float64"):
        kernels.rms_norm_forward(torch.randn(2, 4).bfloat16(), torch.ones(4).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.rms_norm_forward(torch.randn(2, 4).double(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rms_norm_forward(torch.randn(4, 2).t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        kernels.rms_norm_forward(torch.randn(2, 4), torch.ones(5), 1e-5)


@needs_kernels
def test_compiles_into_one_graph_with_the_kernel():
    """fullgraph=True raises on any graph break; the custom op must also give the eager numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, weight, grad = torch.randn(2, 5, 32), torch.randn(32), torch.randn(2, 5, 32)
    ops = []

    def backend(graph, example_inputs):  # record what dynamo put in the graph, then run it as is
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    compiled = torch.compile(lambda t, w, eps: rms_norm(t, w, eps) * 2, fullgraph=True)
    torch.compile(lambda t, w, eps: rms_norm(t, w, eps), fullgraph=True, backend=backend)(x, weight, 1e-5)
    assert any("tformer.rms_norm" in op for op in ops), ops
    got = run(compiled, x, weight, 1e-5, grad)
    want = run(lambda t, w, eps: rms_norm(t, w, eps) * 2, x, weight, 1e-5, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("route", ROUTES)
def test_second_derivative_is_refused_not_wrong(route):
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ROUTES[route](x, weight, 1e-5).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), x)


@needs_kernels
@pytest.mark.parametrize("hugepages", ["1", "0"])
def test_huge_page_advice_leaves_results_alone(fresh_kernels, monkeypatch, hugepages):
    """A 64 MiB output takes the madvise path (or not, when switched off): same numbers either way."""
    monkeypatch.setenv(kernels.ENV_HUGEPAGES, hugepages)
    assert kernels.available() and kernels._hugepages == (hugepages == "1")
    torch.manual_seed(0)
    x = torch.randn(4096, 4096)  # 64 MiB: above HUGEPAGE_MIN_BYTES
    assert x.numel() * 4 >= kernels.HUGEPAGE_MIN_BYTES
    weight, grad = torch.randn(4096), torch.randn(4096, 4096)
    y, gx, gw = run(rms_norm, x, weight, 1e-5, grad)
    rows = slice(0, 4096, 97)  # a sample of rows against the float64 reference
    want = reference(x[rows], weight, 1e-5, grad[rows])
    torch.testing.assert_close(y[rows].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx[rows].double(), want[1], rtol=1e-5, atol=1e-5)
    full = reference(x, weight, 1e-5, grad)[2]
    torch.testing.assert_close(gw.double(), full, rtol=1e-4, atol=1e-3)


@needs_kernels
def test_advice_is_refused_for_less_than_one_aligned_huge_page():
    kernels.available()
    small = torch.empty(1024)
    assert kernels._lib.tformer_advise_hugepages(small.data_ptr(), 4096) == -1
    assert kernels._lib.tformer_advise_hugepages(small.data_ptr(), 0) == -1
