"""The C RMSNorm kernel (tformer.kernels) and the routes ``rms_norm`` chooses between."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import tformer
from tformer import fused_norms, kernels
from tformer.norms import norm_traits
from tformer.rmsnorm import RMSNormFunction, rms_norm

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
    assert "RMSNormFunction" in _route(y)
    for g, w in zip(run(rms_norm, x, weight, 1e-5, grad), reference(x, weight, 1e-5, grad)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not in use"):
        kernels.rms_norm_forward(x.detach(), weight, 1e-5)


@pytest.mark.parametrize("compiler, reason", [("/nonexistent/cc", "does not run"), ("false", "building")])
def test_a_broken_compiler_falls_back_and_says_why(fresh_kernels, monkeypatch, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(kernels.KernelBuildWarning, match=reason):
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


# --- building: warnings, the cache directory, build(), concurrency, pruning, the cache key ---------


def compiler_wrapper(directory, before_compiling):
    """A ``CC`` that runs the shell snippet ``before_compiling`` ahead of each real compile (the
    ``-shared`` invocations; not ``--version`` or ``-###``), then the real compiler."""
    script = directory / "cc"
    script.write_text(f'#!/bin/sh\ncase " $* " in *" -shared "*) {before_compiling} ;; esac\n'
                      f'exec {shlex.join(kernels._compiler())} "$@"\n')
    script.chmod(0o755)
    return str(script)


def build_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, kernels.KernelBuildWarning)]


def test_a_failed_build_warns_once_with_what_runs_instead_and_the_fixes(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.warns(kernels.KernelBuildWarning) as caught:
        status = kernels.status()
    [message] = build_warnings(caught)
    assert not status.available and status.reason in message
    for part in ("not in use", "building the C kernels failed", "pure-PyTorch route", "1.1-1.3x", "nn.LayerNorm",
                 "install a C compiler", "set CC", kernels.ENV_CACHE, f"{kernels.ENV_SWITCH}=0", "--build-kernels"):
        assert part in message, part
    assert issubclass(kernels.KernelBuildWarning, UserWarning)
    with warnings.catch_warnings():  # once per process: not again, not even for an explicit rebuild
        warnings.simplefilter("error", kernels.KernelBuildWarning)
        x = torch.randn(3, 8)
        for _ in range(3):
            torch.testing.assert_close(rms_norm(x, torch.ones(8), 1e-5), F.rms_norm(x, (8,), None, 1e-5))
        assert not kernels.available() and kernels.status() is status
        assert not kernels.build(force=True).available


def test_no_compiler_at_all_warns(fresh_kernels, monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.warns(kernels.KernelBuildWarning, match="no C compiler found.*pure-PyTorch route"):
        assert not kernels.available()
    x = torch.randn(2, 8)
    torch.testing.assert_close(rms_norm(x, torch.ones(8), 1e-5), F.rms_norm(x, (8,), None, 1e-5))


def test_switching_the_kernels_off_does_not_warn(fresh_kernels, monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    monkeypatch.setenv("CC", "false")  # would fail and warn, were it tried
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelBuildWarning)
        assert not kernels.available() and not kernels.build().available
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    assert list(fresh_kernels.iterdir()) == []


@needs_kernels
@pytest.mark.parametrize("how", ["under-a-regular-file", "chmod-0o500"])
def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(fresh_kernels, monkeypatch, tmp_path, how):
    if how == "under-a-regular-file":  # mkdir fails, for root too
        (tmp_path / "a-file").write_text("")
        cache = tmp_path / "a-file" / "cache"
    else:
        cache = tmp_path / "read-only"
        cache.mkdir(mode=0o500)
        if os.geteuid() == 0:  # root writes into it anyway: refuse as the kernel would for anyone else
            real = tempfile.TemporaryFile

            def temporary_file(*args, dir=None, **kwargs):
                if dir is not None and os.path.samefile(dir, cache):
                    raise PermissionError(13, "Permission denied")
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    monkeypatch.setenv(kernels.ENV_CACHE, str(cache))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    private = tmp_path / "tmp" / f"tformer-kernels-{os.getuid()}"
    try:
        with pytest.warns(kernels.KernelBuildWarning) as caught:
            status = kernels.status()
        [message] = build_warnings(caught)
        assert status.available and status.path.startswith(str(private))
        assert status.reason.startswith("built in") and "not writable" in status.reason
        for part in (str(cache), "not writable", str(private), "in use", kernels.ENV_CACHE):
            assert part in message, part
        assert oct(private.stat().st_mode & 0o777) == oct(0o700)
        x = torch.randn(2, 3, 8, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", kernels.KernelBuildWarning)
            y = rms_norm(x, torch.ones(8), 1e-5)
        assert type(y.grad_fn).__name__ == "_KernelFunctionBackward"
        torch.testing.assert_close(y, F.rms_norm(x, (8,), None, 1e-5))
        kernels._reset()  # another process of this user: takes that build, and warns too
        with pytest.warns(kernels.KernelBuildWarning, match="loaded in the temporary directory"):
            again = kernels.status()
        assert again.path == status.path and again.reason.startswith("loaded from the cache in")
    finally:
        if how == "chmod-0o500":
            cache.chmod(0o700)


@needs_kernels
def test_a_temporary_directory_others_can_write_is_not_used(fresh_kernels, monkeypatch, tmp_path):
    """A per-user directory in /tmp that is not private could hold anyone's library: not loaded from."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / "a-file" / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    shared = tmp_path / "tmp" / f"tformer-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.warns(kernels.KernelBuildWarning):
        status = kernels.status()
    assert status.available and os.path.dirname(status.path) != str(shared)  # (a prefix test flaked: uid 0)
    assert os.path.basename(os.path.dirname(status.path)).startswith("tformer-kernels-")
    assert list(shared.iterdir()) == []


@needs_kernels
def test_a_read_only_cache_holding_the_build_serves_it_without_a_warning(fresh_kernels, monkeypatch):
    built = kernels.status()
    kernels._reset()

    def refuse(*args, **kwargs):  # as on a read-only mount (root ignores the chmod below)
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    monkeypatch.setattr(kernels._build, "_unwritable", lambda directory: "read-only, and should not be asked")
    fresh_kernels.chmod(0o500)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", kernels.KernelBuildWarning)
            status = kernels.status()
    finally:
        fresh_kernels.chmod(0o700)
    assert status.available and status.reason == "loaded from the cache" and status.path == built.path


@needs_kernels
def test_build_ahead_of_time(fresh_kernels):
    assert "build" in kernels.__all__
    built = kernels.build()
    assert built.available and built.reason == "built" and built.path.startswith(str(fresh_kernels))
    assert kernels.status() is built and kernels.build() is built  # settled: no second compile
    inode = os.stat(built.path).st_ino
    again = kernels.build(force=True)
    assert again.available and again.reason == "built" and again.path == built.path
    assert os.stat(again.path).st_ino != inode  # compiled afresh and renamed over the old one
    kernels._reset()  # the next process (a torchrun rank) loads it
    assert kernels.status().reason == "loaded from the cache"
    assert [p.name for p in fresh_kernels.iterdir()] == [os.path.basename(built.path)]


@needs_kernels
def test_info_build_kernels_builds_and_prints_the_status(fresh_kernels, capsys):
    from tformer.cli import main

    assert main(["info", "--build-kernels"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("C kernels:")]
    assert "in use" in line and "built: " + str(fresh_kernels) in line
    kernels._reset()
    assert main(["info"]) == 0  # plain info still shows the status
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("C kernels:")]
    assert "in use" in line and "loaded from the cache" in line


def test_info_build_kernels_exits_1_when_the_build_fails(fresh_kernels, monkeypatch, capsys):
    from tformer.cli import main

    monkeypatch.setenv("CC", "false")
    with pytest.warns(kernels.KernelBuildWarning):
        assert main(["info", "--build-kernels"]) == 1
    assert "C kernels:   not in use (building the C kernels failed" in capsys.readouterr().out
    kernels._reset()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")  # switched off: nothing to build, not a failure
    assert main(["info", "--build-kernels"]) == 0


@needs_kernels
@pytest.mark.parametrize("wait", [0.2, 300.0], ids=["falls-back", "waits"])
def test_a_slow_build_in_one_thread_does_not_hold_up_the_others(fresh_kernels, monkeypatch, tmp_path_factory, wait):
    """The first thread compiles (a CC that sleeps 3 s first); a second thread's forward waits at most
    BUILD_WAIT_SECONDS, then takes the pure-PyTorch route (or, with a long wait, gets the kernel)."""
    tools = tmp_path_factory.mktemp("cc")
    compiling = tools / "compiling"
    monkeypatch.setenv("CC", compiler_wrapper(tools, f"touch {shlex.quote(str(compiling))}; sleep 3"))
    monkeypatch.setattr(kernels, "BUILD_WAIT_SECONDS", wait)
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 5, 64), torch.randn(64), torch.randn(4, 5, 64)
    want = reference(x, weight, 1e-5, grad)
    results = {}

    def call(name):
        start = time.monotonic()
        y = rms_norm(x.clone().requires_grad_(), weight, 1e-5)
        results[name] = (run(rms_norm, x, weight, 1e-5, grad), type(y.grad_fn).__name__, time.monotonic() - start)

    first = threading.Thread(target=call, args=("first",))
    first.start()
    deadline = time.monotonic() + 60
    while not compiling.exists():  # the first thread is in the compiler now
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.02)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    second.join(timeout=120)
    second_done_while_building = first.is_alive()
    first.join(timeout=120)
    assert not first.is_alive() and not second.is_alive()
    assert results["first"][1] == "_KernelFunctionBackward"
    if wait < 1:
        assert results["second"][1] == "RMSNormFunctionBackward" and second_done_while_building
        assert results["second"][2] < 2.5  # waited 0.2 s, not for the 3 s build
    else:
        assert results["second"][1] == "_KernelFunctionBackward"  # waited for the build, and got it
    for name in ("first", "second"):
        for g, w in zip(results[name][0], want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    status = kernels.status()
    assert status.available and status.reason == "built"
    assert [p.name for p in fresh_kernels.iterdir()] == [os.path.basename(status.path)]


@needs_kernels
def test_ranks_building_at_once_leave_one_complete_build(fresh_kernels, monkeypatch, tmp_path_factory):
    """Two processes (torchrun ranks) compile the same key at the same moment (the CC makes each wait
    for the other): each writes its own temporary and renames it; both load a complete library."""
    tools = tmp_path_factory.mktemp("cc")
    barrier = tools / "barrier"
    barrier.mkdir()
    wait_for_both = (f'touch {shlex.quote(str(barrier))}/$$; n=0; '
                     f'while [ "$(ls {shlex.quote(str(barrier))} | wc -l)" -lt 2 ] && [ $n -lt 1200 ]; '
                     f'do sleep 0.05; n=$((n+1)); done')
    monkeypatch.setenv("CC", compiler_wrapper(tools, wait_for_both))  # the same key here, for the check below
    env = {**os.environ, kernels.ENV_CACHE: str(fresh_kernels), "OMP_NUM_THREADS": "1"}
    env.pop(kernels.ENV_SWITCH, None)
    code = "from tformer import kernels; s = kernels.build(); print(s.available, s.reason, s.path)"
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    lines = {out.strip() for out, _ in outputs}
    assert len(os.listdir(barrier)) == 2  # both compiled, at the same time
    [line] = lines  # the same build
    assert line.startswith("True built ")
    path = line.split(" ", 2)[2]
    assert [p.name for p in fresh_kernels.iterdir()] == [os.path.basename(path)]  # no temporaries
    here = kernels.status()
    assert here.path == path and here.reason == "loaded from the cache"


@needs_kernels
def test_a_new_build_prunes_stale_builds_and_nothing_else(fresh_kernels, tmp_path_factory):
    old = time.time() - 2 * kernels._build.PRUNE_UNUSED_SECONDS
    outside = tmp_path_factory.mktemp("outside") / "precious.so"
    outside.write_text("not ours")
    files = {  # name: (age, pruned?)
        "rmsnorm-0123456789abcdef.so": (old, True),  # another key, unused for long
        "rmsnorm-fedcba9876543210.so": (time.time(), False),  # another key, used just now (say another machine)
        ".rmsnorm-0123456789abcdef-ab_12cd.tmp": (old, True),  # left by a killed compile
        ".rmsnorm-0123456789abcdef-live1234.tmp": (time.time(), False),  # a compile under way
        "rmsnorm-notakey.so": (old, False),
        "rmsnorm-0123456789abcdef.so.bak": (old, False),
        "notes.txt": (old, False),
    }
    for name, (when, _) in files.items():
        (fresh_kernels / name).write_text("")
        os.utime(fresh_kernels / name, (when, when))
    link = fresh_kernels / "rmsnorm-aaaaaaaaaaaaaaaa.so"
    link.symlink_to(outside)
    os.utime(link, (old, old), follow_symlinks=False)
    status = kernels.status()
    assert status.reason == "built"
    kept = {name for name, (_, pruned) in files.items() if not pruned}
    assert {p.name for p in fresh_kernels.iterdir()} == kept | {link.name, os.path.basename(status.path)}
    assert outside.read_text() == "not ours"
    # loading from the cache prunes nothing, and marks the build as used
    stale = fresh_kernels / "rmsnorm-1111111111111111.so"
    stale.write_text("")
    os.utime(stale, (old, old))
    os.utime(status.path, (old, os.stat(status.path).st_mtime))
    kernels._reset()
    assert kernels.status().reason == "loaded from the cache" and stale.exists()
    assert os.stat(status.path).st_atime > time.time() - 600


@needs_kernels
@pytest.mark.parametrize("probe", ["_cpu_signature", "_native_target"])
def test_the_cache_key_follows_the_cpus_instruction_set(fresh_kernels, monkeypatch, probe):
    """A cache shared by two machines with different ISA features holds two builds, never one."""
    paths = []
    for features in ("flags : fpu sse2 avx avx2", "flags : fpu sse2 avx avx2 avx512f"):
        monkeypatch.setattr(kernels._build, probe, lambda *args, features=features: features)
        kernels._reset()
        status = kernels.status()
        assert status.available and status.reason == "built"
        paths.append(status.path)
    assert paths[0] != paths[1] and all(os.path.exists(p) for p in paths)


@needs_kernels
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux: /proc/cpuinfo")
def test_the_cache_key_reads_the_isa_features_and_march_native():
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "").strip()
    assert flags and flags in kernels._build._cpu_signature()
    target = kernels._build._native_target(tuple(kernels._compiler()))
    assert "-march=" in target or "-target-cpu" in target or "-mcpu=" in target, target


# ---- The other norms' kernels (norms.c through tformer.fused_norms) ------------------------------


#: (norm, options, padding mask or not): every kernel route, and the padded BatchNorm one
NORM_CASES = [
    ("dyt", {}, False), ("dyt", {"bias": False, "alpha_init": 1.7}, False),
    ("scalenorm", {}, False), ("adanorm", {}, False), ("adanorm", {"k": 0.3, "scale": 2.0}, False),
    ("powernorm", {"warmup_iters": 1}, False), ("powernorm", {"group_num": 4, "warmup_iters": 0}, False),
    ("powernorm", {"group_num": 0, "bias": False, "warmup_iters": 5}, False),
    ("powernorm", {"group_num": 4, "warmup_iters": 1}, True),
    ("batchnorm", {}, False), ("batchnorm", {"bias": False}, False), ("batchnorm", {}, True),
]
#: the autograd Function each kernel route runs (eager)
KERNEL_FUNCTIONS = {"dyt": "_DyTFunction", "scalenorm": "_ScaleNormFunction", "adanorm": "_AdaNormFunction",
                    "powernorm": "PowerNormKernelFunction", "batchnorm": "BatchNormKernelFunction"}


def _route(y):
    """The autograd node names behind ``y`` (through a reshaping view)."""
    node = y.grad_fn
    names = [type(node).__name__]
    if node.next_functions and node.next_functions[0][0] is not None:
        names.append(type(node.next_functions[0][0]).__name__)
    return " ".join(names)


def _norm_pair(name, options, dtype):
    torch.manual_seed(0)
    norm = tformer.make_norm(name, 32, **options).to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return norm, copy.deepcopy(norm)


def _steps(norm, x, grad, pad, steps=2):
    """Outputs, input gradients and parameter gradients of ``steps`` training steps, then the buffers."""
    results = []
    for _ in range(steps):
        leaf = x.detach().clone().requires_grad_()
        for p in norm.parameters():
            p.grad = None
        y = norm(leaf, padding_mask=pad)
        y.backward(grad)
        results += [y.detach(), leaf.grad, *(p.grad for p in norm.parameters())]
    return results + [b.clone() for b in norm.buffers()], y


def _inputs(dtype, pad):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32, dtype=dtype) * 2 + 0.5
    x[0, 1] = 0  # ScaleNorm: a row below eps, where the clamp cuts the gradient off
    grad = torch.randn(3, 7, 32, dtype=dtype)
    mask = torch.rand(3, 7) < 0.3 if pad else None
    return x, grad, mask


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, options, pad", NORM_CASES, ids=lambda v: str(v))
def test_norm_kernels_match_the_composite_route(monkeypatch, name, options, pad, dtype):
    """Forward, every gradient and every buffer (running statistics, nu, iters) after two steps equal
    the pure-PyTorch route's (float64 to 1e-10, float32 to 1e-5)."""
    kernel_norm, composite_norm = _norm_pair(name, options, dtype)
    x, grad, mask = _inputs(dtype, pad)
    got, y = _steps(kernel_norm, x, grad, mask)
    assert KERNEL_FUNCTIONS[name] in _route(y)
    monkeypatch.setattr(fused_norms, "_kernels_available", lambda: False)
    want, y = _steps(composite_norm, x, grad, mask)
    assert KERNEL_FUNCTIONS[name] not in _route(y)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


@needs_kernels
@pytest.mark.parametrize("name, options, pad", [c for c in NORM_CASES if norm_traits(c[0]).exact_gradient],
                         ids=lambda v: str(v))
def test_norm_kernels_gradcheck_float64(name, options, pad):
    """DyT, ScaleNorm and BatchNorm have exact gradients: gradcheck the kernel route in float64."""
    norm, _ = _norm_pair(name, options, torch.float64)
    x, _, mask = _inputs(torch.float64, pad)
    x = x[:2, :5, :].contiguous()
    x[0, 1] = 0.3  # away from ScaleNorm's clamp, where the derivative jumps
    mask = None if mask is None else mask[:2, :5]
    params = dict(norm.named_parameters())

    def f(x, *values):
        return torch.func.functional_call(norm, dict(zip(params, values)), (x,), {"padding_mask": mask})

    assert KERNEL_FUNCTIONS[name] in _route(f(x.requires_grad_(), *params.values()))
    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-7)


@needs_kernels
def test_float32_tanh_is_accurate_everywhere():
    """DyT's float32 kernel computes tanh itself: within 1e-6 relative of float64 tanh, also near 0
    (no cancellation), at the cut-off, for huge values, infinities and NaN."""
    values = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-38, 1.5, 20_001),
                        -torch.logspace(-38, 1.5, 20_001), torch.tensor([0.0, 1e-45, 10.0, 9.99, 1e30])])
    values = torch.cat([values, torch.tensor([float("inf"), -float("inf"), float("nan")])]).float()
    one, zero = torch.ones((), dtype=torch.float32), torch.zeros(1, dtype=torch.float32)
    y, _ = kernels.dyt_forward(values.view(1, -1).contiguous(), one, torch.ones(values.numel()), None)
    y = y.view(-1)
    want = torch.tanh(values.double())
    finite = ~want.isnan()
    torch.testing.assert_close(y[finite].double(), want[finite], rtol=1e-6, atol=0)
    assert y[-1].isnan() and y[-3] == 1 and y[-2] == -1 and zero.abs().sum() == 0


@needs_kernels
@pytest.mark.parametrize("name", ["dyt", "scalenorm", "adanorm", "powernorm", "batchnorm"])
def test_half_inputs_and_eval_mode_take_the_composite_route(name):
    norm = tformer.make_norm(name, 16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = norm(x.bfloat16())
    assert KERNEL_FUNCTIONS[name] not in _route(y)  # (the composite promotes as before)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    if norm_traits(name).uses_batch_statistics:
        norm.eval()
        assert KERNEL_FUNCTIONS[name] not in _route(norm(x))


@needs_kernels
@pytest.mark.parametrize("name", ["powernorm", "batchnorm"])
def test_a_batch_without_real_tokens_takes_the_composite_route(monkeypatch, name):
    kernel_norm, composite_norm = _norm_pair(name, {}, torch.float32)
    x, grad, _ = _inputs(torch.float32, False)
    pad = torch.ones(3, 7, dtype=torch.bool)
    got, y = _steps(kernel_norm, x, grad, pad, steps=1)
    assert KERNEL_FUNCTIONS[name] not in _route(y)
    monkeypatch.setattr(fused_norms, "_kernels_available", lambda: False)
    want, _ = _steps(composite_norm, x, grad, pad, steps=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)


def test_norms_switched_off_by_the_environment_take_the_composite_route(fresh_kernels, monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    for name, function in KERNEL_FUNCTIONS.items():
        y = tformer.make_norm(name, 16)(torch.randn(2, 3, 16, requires_grad=True))
        assert function not in _route(y)
        y.sum().backward()


@needs_kernels
def test_norm_kernels_compile_into_one_graph():
    """DyT, ScaleNorm and AdaNorm put their custom ops in the graph (fullgraph=True raises on a graph
    break) and give eager's numbers; PowerNorm and BatchNorm compile their composite route."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, grad = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for name, op in [("dyt", "tformer.dyt"), ("scalenorm", "tformer.scale_norm"), ("adanorm", "tformer.ada_norm"),
                     ("powernorm", None), ("batchnorm", None)]:
        eager, compiled_norm = _norm_pair(name, {}, torch.float32)
        ops = []

        def backend(graph, example_inputs, ops=ops):
            ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
            return graph.forward

        torch.compile(copy.deepcopy(eager), fullgraph=True, backend=backend)(x)
        assert op is None or any(op in o for o in ops), (name, ops)
        compiled = torch.compile(compiled_norm, fullgraph=True, backend="aot_eager")
        got, _ = _steps(compiled, x, grad, None, steps=1)
        want, _ = _steps(eager, x, grad, None, steps=1)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("name, options, pad", [c for c in NORM_CASES if c[1] == {} or c[2]], ids=lambda v: str(v))
def test_norm_kernels_match_the_composite_route_on_several_threads(monkeypatch, name, options, pad):
    """Large enough for the kernels' OpenMP regions (per-thread partial sums, BatchNorm's barriers)."""
    kernel_norm, composite_norm = _norm_pair(name, options, torch.float64)
    torch.manual_seed(2)
    x, grad = torch.randn(4, 301, 32, dtype=torch.float64), torch.randn(4, 301, 32, dtype=torch.float64)
    mask = torch.rand(4, 301) < 0.3 if pad else None
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got, y = _steps(kernel_norm, x, grad, mask)
    finally:
        torch.set_num_threads(threads)
    assert KERNEL_FUNCTIONS[name] in _route(y)
    monkeypatch.setattr(fused_norms, "_kernels_available", lambda: False)
    want, _ = _steps(composite_norm, x, grad, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
