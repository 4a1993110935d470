"""Native CPU kernels: C sources in this folder, compiled on first use and called through ctypes.

PyTorch has no fused RMSNorm on the CPU (``F.rms_norm`` is a composite of five or more
full-size passes). ``rmsnorm.c`` does the forward and the backward in one pass over memory each,
like ``nn.LayerNorm``'s kernel; ``norms.c``, compiled into the same library, does the same for
DyT, ScaleNorm, AdaNorm, PowerNorm and BatchNorm (``tformer.fused_norms`` wraps them; the batch
statistics of the last two take one more pass each way). Both are plain C with OpenMP (no PyTorch
headers), so building them takes about a second with the system's C compiler; the shared library is cached under
``$TFORMER_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tformer`` or ``~/.cache/tformer``) and loaded
from there afterwards. Its file name is a hash of the sources, the compiler and its version, the
flags, the CPU's ISA features (``/proc/cpuinfo``) and what ``-march=native`` resolves to, so a
cache shared between machines never hands one a build for instructions it lacks. After a new
build, builds of other keys unused for a day are deleted (``_build.prune``; nothing else is).

The first call of ``status()``, ``available()`` or an RMSNorm builds or loads them; ``build()``
does it ahead of time (``tformer info --build-kernels``, e.g. before torchrun starts its ranks).
Compiles write a temporary file of their own and rename it into the cache, so threads and
processes building at once are safe and no one loads a half-written library. No lock is held
while compiling: one thread builds, other threads wait for it at most ``BUILD_WAIT_SECONDS`` and
then take the pure-PyTorch route until it is ready. A cache directory that cannot be written
is replaced by a temporary one.

When no compiler is found or the build fails, ``available()`` is False, ``status()`` says why,
the callers use their pure-PyTorch route instead (same results to rounding, slower), and a
``KernelBuildWarning`` says so once per process (likewise for the temporary-directory
fallback). ``TFORMER_CPU_KERNELS=0`` switches the kernels off without a warning. Nothing here
runs at import time.

Outputs over 32 MiB are fresh mmaps whose first write costs one page fault per 4 KiB (at
(8, 2048, 1024) that is more time than the arithmetic, for ``nn.LayerNorm`` too); the kernels ask
for transparent huge pages on them first (``madvise``, Linux, where THP is in "madvise" or
"always" mode), which PyTorch itself does only under ``THP_MEM_ALLOC_ENABLE=1``.
``TFORMER_HUGEPAGES=0`` switches that off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings

import torch
from torch import Tensor

from . import _build
from ._build import ABI_VERSION, ENV_CACHE, ENV_SWITCH, SOURCE, cache_dir  # noqa: F401 (kept here)
from ._build import KernelBuildWarning, KernelStatus
from ._build import compiler_command as _compiler
from ._build import switched_off as _switched_off

__all__ = ["KERNEL_DTYPES", "KernelBuildWarning", "KernelStatus", "available", "build", "rms_norm_backward",
           "rms_norm_forward", "status"]

ENV_HUGEPAGES = "TFORMER_HUGEPAGES"
#: Outputs at least this big get ``madvise(MADV_HUGEPAGE)`` before the kernel writes them. glibc
#: serves blocks over 32 MiB (its largest mmap threshold on 64-bit) with a fresh mmap every time,
#: so each one page-faults 4 KiB at a time; smaller blocks come back from the heap already mapped,
#: and advising those measured slower (16 MiB: 4.5 vs 3.6 ms).
HUGEPAGE_MIN_BYTES = 32 << 20
#: dtypes the C kernels take (input, weight and outputs all of that dtype)
KERNEL_DTYPES = dict(zip((torch.float32, torch.float64), _build.SUFFIXES))
#: How long ``status()`` (and so an RMSNorm forward) waits for another thread's build before it
#: takes the pure-PyTorch route for this call; a build takes well under a second.
BUILD_WAIT_SECONDS = 2.0

_lock = threading.Lock()  # guards the state below; never held while compiling
_lib: ctypes.CDLL | None = None
_status: KernelStatus | None = None
_hugepages = False
_building: threading.Event | None = None  # set when the build under way (in some thread) is done
_warned = False


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` (``torch.compile`` takes ``fn()``'s result as a constant
    instead of tracing into it) without importing ``torch._dynamo``, which that function does and which costs
    about 2 s of every ``import tformer`` on a CPU like this one. It sets the marker torch's own decorator
    sets; tests/test_compile.py checks that the two agree, so a torch release that renames it fails there."""
    fn._dynamo_marked_constant = True
    return fn


@constant_for_compile
def available() -> bool:
    """True when the C kernels are built and loaded (building them on the first call); a constant to
    ``torch.compile``, which never traces into the build and ctypes."""
    return status().available


def status() -> KernelStatus:
    """The kernels' state; the first call builds or loads them. While another thread builds, this
    waits up to ``BUILD_WAIT_SECONDS``, then returns a not-available status for the time being."""
    current = _status
    return current if current is not None else _settle(BUILD_WAIT_SECONDS)


def build(*, force: bool = False) -> KernelStatus:
    """Build (or load from the cache) the kernels now and return their status; with ``force``,
    compile afresh even if the cache has a build (e.g. a single-threaded one from before OpenMP was
    installed). Waits for a build under way in another thread. Run it (or ``tformer info
    --build-kernels``) once before starting several processes, so that they all load one build."""
    return _settle(None, force=force)


def _settle(wait: float | None, force: bool = False) -> KernelStatus:
    """Build or load in this thread, or wait up to ``wait`` seconds (None: as long as it takes)
    for the thread that is doing so. The lock is only held to read and publish the state."""
    global _lib, _status, _hugepages, _building
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        with _lock:
            if _status is not None and not force:
                return _status
            if _building is None:
                _building = done = threading.Event()
                break
            done = _building
        if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return KernelStatus(False, "being built by another thread; the pure-PyTorch route runs meanwhile")
        force = False  # that build is as fresh as ours would be
    try:
        lib, loaded, warning = _build.load(force=force)
        with _lock:  # _status last: status() reads it without the lock
            _lib = lib
            _hugepages = lib is not None and not _switched_off(ENV_HUGEPAGES)
            _status = loaded
    finally:
        with _lock:
            _building = None
        done.set()
    if warning:
        _warn_once(warning)
    return loaded


def _warn_once(message: str) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    level, frame = 3, sys._getframe(2)  # point at the first caller outside tformer and torch
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("tformer", "torch")):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, KernelBuildWarning, stacklevel=level)


def _after_fork_in_child() -> None:
    """A child forked while a thread of its parent was building has no such thread: it builds itself."""
    global _lock, _building
    _lock, _building = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _reset() -> None:
    """Forget the loaded state and the warning, as in a fresh process (tests switch the environment)."""
    global _lib, _status, _hugepages, _warned
    with _lock:
        _lib, _status, _hugepages, _warned = None, None, False, False


def _check(name: str, weight: Tensor, *rows: Tensor) -> None:
    d = weight.shape[-1]
    for tensor in (weight, *rows):
        if tensor.device.type != "cpu" or tensor.dtype not in KERNEL_DTYPES or not tensor.is_contiguous():
            raise ValueError(f"{name}: the C kernel takes contiguous CPU float32/float64 tensors, "
                             f"got {tensor.dtype} on {tensor.device} (contiguous={tensor.is_contiguous()})")
        if tensor.dtype != weight.dtype:
            raise ValueError(f"{name}: dtypes differ ({tensor.dtype} vs weight {weight.dtype})")
    if weight.dim() != 1 or any(t.shape[-1] != d for t in rows):
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} does not match the last "
                         f"dimension of {[tuple(t.shape) for t in rows]}")


def _library() -> ctypes.CDLL:
    """The loaded library; waits for a build under way, however long (the caller asked for the kernel)."""
    lib = _lib
    if lib is None:
        _settle(None)
        lib = _lib
        if lib is None:
            raise RuntimeError(f"tformer's C kernels are {status()}")
    return lib


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(y, rstd)`` for contiguous ``x`` of shape ``(..., d)``; ``rstd`` has shape ``x.shape[:-1]``."""
    _check("rms_norm_forward", weight, x)
    return _forward(x, weight, eps)


def rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_weight)`` from the forward's ``x`` and ``rstd``."""
    _check("rms_norm_backward", weight, grad_y, x)
    if grad_y.shape != x.shape or rstd.shape != x.shape[:-1] or rstd.dtype != x.dtype:
        raise ValueError(f"rms_norm_backward: shapes grad {tuple(grad_y.shape)}, x {tuple(x.shape)}, "
                         f"rstd {tuple(rstd.shape)} ({rstd.dtype}) do not fit together")
    return _backward(grad_y, x, weight, rstd.contiguous())


# Unchecked versions for tformer.norms, which has checked what they need (a few microseconds a call).

def _fresh_like(x: Tensor) -> Tensor:
    """``empty_like(x)``, with huge pages asked for when it is big (see ``HUGEPAGE_MIN_BYTES``)."""
    out = torch.empty_like(x)
    nbytes = out.numel() * out.element_size()
    if _hugepages and nbytes >= HUGEPAGE_MIN_BYTES:
        _lib.tformer_advise_hugepages(out.data_ptr(), nbytes)
    return out


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    y, rstd = _fresh_like(x), x.new_empty(x.shape[:-1])
    if x.numel():
        getattr(_library(), f"tformer_rmsnorm_forward_{KERNEL_DTYPES[x.dtype]}")(
            x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), x.numel() // d, d,
            float(eps), torch.get_num_threads())
    return y, rstd


def _backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """All of them contiguous; ``rstd`` as the forward returned it."""
    d = x.shape[-1]
    parts = max(1, torch.get_num_threads())
    grad_x, partial = _fresh_like(x), x.new_zeros(parts, d)
    if x.numel():
        getattr(_library(), f"tformer_rmsnorm_backward_{KERNEL_DTYPES[x.dtype]}")(
            grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
            grad_x.data_ptr(), partial.data_ptr(), x.numel() // d, d, parts)
    return grad_x, partial.sum(0)


# The other norms (norms.c), unchecked like ``_forward``/``_backward``: ``tformer.fused_norms`` checks
# that every tensor is a contiguous CPU tensor of one kernel dtype first. Column sums come back
# through per-thread partial rows, summed here.

def _call(name: str, x: Tensor, *args) -> None:
    getattr(_library(), f"tformer_{name}_{KERNEL_DTYPES[x.dtype]}")(*args)


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _partials(x: Tensor, width: int) -> tuple[Tensor, int]:
    parts = max(1, torch.get_num_threads())
    return x.new_zeros(parts, width), parts


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None, keep_tanh: bool = False
                ) -> tuple[Tensor, Tensor | None]:
    """``(weight * tanh(alpha * x) + bias, tanh(alpha * x) if keep_tanh else None)``."""
    d = x.shape[-1]
    y, t = _fresh_like(x), (_fresh_like(x) if keep_tanh else None)
    if x.numel():
        _call("dyt_forward", x, x.data_ptr(), alpha.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(),
              _ptr(t), x.numel() // d, d, torch.get_num_threads())
    return y, t


def dyt_backward(grad_y: Tensor, x: Tensor, t: Tensor | None, alpha: Tensor, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_alpha, grad_weight, grad_bias)``; ``t`` the forward's tanh, or None to recompute it."""
    d = x.shape[-1]
    grad_x, (partial, parts) = _fresh_like(x), _partials(x, 2 * d + 1)
    if x.numel():
        _call("dyt_backward", x, grad_y.data_ptr(), x.data_ptr(), _ptr(t), alpha.data_ptr(), weight.data_ptr(),
              grad_x.data_ptr(), partial.data_ptr(), x.numel() // d, d, parts)
    total = partial.sum(0)
    return grad_x, total[2 * d].clone(), total[:d].clone(), total[d:2 * d].clone()  # no aliases (custom ops)


def scale_norm_forward(x: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(scale * x / max(|x|, eps), |x|)``; the norms have shape ``x.shape[:-1]``."""
    d = x.shape[-1]
    y, norm = _fresh_like(x), x.new_empty(x.shape[:-1])
    if x.numel():
        _call("scalenorm_forward", x, x.data_ptr(), scale.data_ptr(), y.data_ptr(), norm.data_ptr(),
              x.numel() // d, d, float(eps), torch.get_num_threads())
    return y, norm


def scale_norm_backward(grad_y: Tensor, x: Tensor, scale: Tensor, norm: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_scale)``."""
    d = x.shape[-1]
    grad_x, (partial, parts) = _fresh_like(x), _partials(x, 1)
    if x.numel():
        _call("scalenorm_backward", x, grad_y.data_ptr(), x.data_ptr(), scale.data_ptr(), norm.data_ptr(),
              grad_x.data_ptr(), partial.data_ptr(), x.numel() // d, d, float(eps), parts)
    return grad_x, partial.sum()


def ada_norm_forward(x: Tensor, eps: float, k: float, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ``y = scale * (1 - k * u) * u`` with ``u`` LayerNorm's output without affine."""
    d = x.shape[-1]
    y, mean, rstd = _fresh_like(x), x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1])
    if x.numel():
        _call("adanorm_forward", x, x.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
              x.numel() // d, d, float(eps), float(k), float(scale), torch.get_num_threads())
    return y, mean, rstd


def ada_norm_backward(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, k: float, scale: float) -> Tensor:
    """``grad_x`` with the factor ``scale * (1 - k * u)`` held constant (detached)."""
    d = x.shape[-1]
    grad_x = _fresh_like(x)
    if x.numel():
        _call("adanorm_backward", x, grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
              grad_x.data_ptr(), x.numel() // d, d, float(k), float(scale), torch.get_num_threads())
    return grad_x


def power_norm_stats(x: Tensor, groups: int, group_eps: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(r, column sums of (x * r)^2)`` (summed in float64 over blocks of 64 rows summed in ``x``'s
    dtype; only the rows where ``keep``, a bool per row, is True): ``r`` of shape ``(tokens, groups)`` is each token's
    ``1 / rms`` within each channel group (GroupScaling1D; empty when ``groups`` is 0)."""
    d = x.shape[-1]
    rows = x.numel() // d
    r = x.new_empty(rows, groups)
    partial, parts = _partials(x.new_empty(0, dtype=torch.float64), d)
    scratch = x.new_empty(parts, d)
    if x.numel():
        _call("powernorm_stats", x, x.data_ptr(), _ptr(keep), r.data_ptr(), scratch.data_ptr(), partial.data_ptr(),
              rows, d, groups, float(group_eps), parts)
    return r, partial.sum(0).to(x.dtype)


def power_norm_forward(x: Tensor, r: Tensor, psi2: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                       eps: float) -> tuple[Tensor, Tensor]:
    """``((x * r) * scale * weight + bias, scale)`` with ``scale = 1 / sqrt(psi2 + eps)`` per channel."""
    d = x.shape[-1]
    y, scale = _fresh_like(x), x.new_empty(d)
    _call("powernorm_forward", x, x.data_ptr(), r.data_ptr(), psi2.data_ptr(), weight.data_ptr(), _ptr(bias),
          y.data_ptr(), scale.data_ptr(), x.numel() // d, d, groups, float(eps), torch.get_num_threads())
    return y, scale


def power_norm_backward(grad_y: Tensor, x: Tensor, r: Tensor, scale: Tensor, batch_psi2: Tensor, nu: Tensor,
                        weight: Tensor, keep: Tensor | None, count: int, groups: int, eps: float, alpha_bwd: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of PowerNorm's approximate backward chained with group
    scaling's; adds the mean of ``gt * xhat`` over the ``count`` rows where ``keep`` is True (all
    when None) to ``nu`` in place (see norms.c)."""
    d = x.shape[-1]
    parts = max(1, torch.get_num_threads())
    grad_x, grad_w, grad_b = _fresh_like(x), x.new_empty(d), x.new_empty(d)
    coef, partial = x.new_empty(2, d), x.new_empty(parts, 3 * d)
    _call("powernorm_backward", x, grad_y.data_ptr(), x.data_ptr(), r.data_ptr(), scale.data_ptr(),
          batch_psi2.data_ptr(), nu.data_ptr(), weight.data_ptr(), _ptr(keep), grad_x.data_ptr(), grad_w.data_ptr(),
          grad_b.data_ptr(), coef.data_ptr(), partial.data_ptr(), x.numel() // d, d, groups, float(eps),
          float(alpha_bwd), float(count), parts)
    return grad_x, grad_w, grad_b


def batch_norm_stats(x: Tensor, keep: Tensor | None, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 column sums of ``x - shift`` and its square over the rows where ``keep`` (bool, one
    per row; None: all rows) is True (summed in ``x``'s dtype over blocks of 64 rows)."""
    d = x.shape[-1]
    partial, parts = _partials(x.new_empty(0, dtype=torch.float64), 2 * d)
    scratch = x.new_empty(parts, 2 * d)
    if x.numel():
        _call("batchnorm_stats", x, x.data_ptr(), _ptr(keep), shift.data_ptr(), scratch.data_ptr(),
              partial.data_ptr(), x.numel() // d, d, parts)
    total = partial.sum(0)
    return total[:d], total[d:]


def batch_norm_forward(x: Tensor, mean: Tensor, a: Tensor, bias: Tensor | None) -> Tensor:
    """``(x - mean) * a + bias`` per channel."""
    d = x.shape[-1]
    y = _fresh_like(x)
    if x.numel():
        _call("batchnorm_forward", x, x.data_ptr(), mean.data_ptr(), a.data_ptr(), _ptr(bias), y.data_ptr(),
              x.numel() // d, d, torch.get_num_threads())
    return y


def batch_norm_backward(grad_y: Tensor, x: Tensor, keep: Tensor | None, mean: Tensor, rstd: Tensor, weight: Tensor,
                        count: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of ``(x - mean) * rstd * weight + bias`` on ``(rows, d)``
    rows, exact through ``mean`` and ``rstd`` (float64), the statistics of the ``count`` rows where
    ``keep`` is True (all when None)."""
    d = x.shape[-1]
    parts = max(1, torch.get_num_threads())
    grad_x, grad_w, grad_b = _fresh_like(x), x.new_zeros(d), x.new_zeros(d)
    coef, scratch = x.new_empty(3, d), x.new_empty(parts, 2 * d)  # a, c0, c2 per channel (see norms.c)
    partial = x.new_empty(parts, 2 * d, dtype=torch.float64)
    if x.numel():
        _call("batchnorm_backward", x, grad_y.data_ptr(), x.data_ptr(), _ptr(keep), mean.data_ptr(), rstd.data_ptr(),
              weight.data_ptr(), float(count), grad_x.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(),
              coef.data_ptr(), scratch.data_ptr(), partial.data_ptr(), x.numel() // d, d, parts)
    return grad_x, grad_w, grad_b
