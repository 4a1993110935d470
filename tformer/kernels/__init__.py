"""Native CPU kernels: C sources in this folder, compiled on first use and called through ctypes.

PyTorch has no fused RMSNorm on the CPU (``F.rms_norm`` is a composite of five or more
full-size passes). ``rmsnorm.c`` does the forward and the backward in one pass over memory each,
like ``nn.LayerNorm``'s kernel. It is plain C with OpenMP (no PyTorch headers), so building it
takes a fraction of a second with the system's C compiler; the shared library is cached under
``$TFORMER_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tformer`` or ``~/.cache/tformer``) by a hash of
the source, the compiler, its flags and the CPU, and loaded from there afterwards.

When no compiler is found, the build fails, or ``TFORMER_CPU_KERNELS=0`` is set, ``available()``
is False, ``status()`` says why, and the callers use their pure-PyTorch route instead (same
results to rounding, somewhat slower). Nothing here runs at import time.

Outputs over 32 MiB are fresh mmaps whose first write costs one page fault per 4 KiB (at
(8, 2048, 1024) that is more time than the arithmetic, for ``nn.LayerNorm`` too); the kernels ask
for transparent huge pages on them first (``madvise``, Linux, where THP is in "madvise" or
"always" mode), which PyTorch itself does only under ``THP_MEM_ALLOC_ENABLE=1``.
``TFORMER_HUGEPAGES=0`` switches that off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KERNEL_DTYPES", "KernelStatus", "available", "rms_norm_backward", "rms_norm_forward", "status"]

ENV_SWITCH = "TFORMER_CPU_KERNELS"
ENV_CACHE = "TFORMER_CACHE_DIR"
ENV_HUGEPAGES = "TFORMER_HUGEPAGES"
#: Outputs at least this big get ``madvise(MADV_HUGEPAGE)`` before the kernel writes them. glibc
#: serves blocks over 32 MiB (its largest mmap threshold on 64-bit) with a fresh mmap every time,
#: so each one page-faults 4 KiB at a time; smaller blocks come back from the heap already mapped,
#: and advising those measured slower (16 MiB: 4.5 vs 3.6 ms).
HUGEPAGE_MIN_BYTES = 32 << 20
SOURCE = Path(__file__).with_name("rmsnorm.c")
ABI_VERSION = 2
#: dtypes the C kernels take (input, weight and outputs all of that dtype)
KERNEL_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
# -march=native: the library is built on, and keyed to, the CPU it runs on
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"],
    ["-O3", "-march=native", "-std=c11", "-shared", "-fPIC"],  # compilers without OpenMP (Apple clang)
    ["-O3", "-std=c11", "-shared", "-fPIC"],  # compilers without -march=native
)


@dataclass(frozen=True)
class KernelStatus:
    """Whether the native kernels are in use, where from, and if not, why not."""

    available: bool
    reason: str
    path: str | None = None
    openmp: bool = False

    def __str__(self) -> str:
        if not self.available:
            return f"not in use ({self.reason})"
        threads = "OpenMP" if self.openmp else "single-threaded"
        return f"in use ({threads}; {self.path})"


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: KernelStatus | None = None
_hugepages = False


def available() -> bool:
    """True when the C kernels are built and loaded (building them on the first call)."""
    return status().available


def status() -> KernelStatus:
    """The kernels' state; the first call builds or loads them."""
    global _lib, _status, _hugepages
    if _status is None:
        with _lock:
            if _status is None:
                _lib, _status = _load()
                _hugepages = _lib is not None and not _switched_off(ENV_HUGEPAGES)
    return _status


def _reset() -> None:
    """Forget the loaded state so the next call looks again (tests switch the environment)."""
    global _lib, _status, _hugepages
    with _lock:
        _lib, _status, _hugepages = None, None, False


def _switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tformer"


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (may carry arguments, e.g. ``ccache gcc``), else cc, gcc, clang."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    if _switched_off(ENV_SWITCH):
        return None, KernelStatus(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    compiler = _compiler()
    if compiler is None:
        return None, KernelStatus(False, "no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, KernelStatus(False, f"C compiler {shlex.join(compiler)!r} does not run: {error}")
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, shlex.join(compiler).encode(), version.encode(), " ".join(flags).encode(),
                        _cpu_signature().encode()])
        ).hexdigest()[:16]
        path = cache_dir() / f"rmsnorm-{key}.so"
        how = "loaded from the cache"
        if not path.exists():
            error = _build(compiler, flags, path)
            if error:
                errors.append(error)
                continue
            how = "built"
        try:
            lib = ctypes.CDLL(str(path))
            if lib.tformer_kernels_abi() != ABI_VERSION:
                raise OSError(f"{path} has ABI {lib.tformer_kernels_abi()}, expected {ABI_VERSION}")
            _declare(lib)
        except (OSError, AttributeError) as error:
            errors.append(f"loading {path}: {error}")
            continue
        return lib, KernelStatus(True, how, str(path), bool(lib.tformer_kernels_openmp()))
    return None, KernelStatus(False, "building the C kernels failed: " + " | ".join(errors))


def _build(compiler: list[str], flags: list[str], path: Path) -> str | None:
    """Compile into a temporary file next to ``path`` and rename it (concurrent builds are safe)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as error:
        return f"cache directory {path.parent}: {error}"
    command = [*compiler, *flags, str(SOURCE), "-o", tmp, "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            return f"{shlex.join(command)}: {last}"
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return f"{shlex.join(command)}: {error}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    pointer, i64, c_int, c_double = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in KERNEL_DTYPES.values():
        forward = getattr(lib, f"tformer_rmsnorm_forward_{suffix}")
        forward.argtypes = [pointer, pointer, pointer, pointer, i64, i64, c_double, c_int]
        forward.restype = None
        backward = getattr(lib, f"tformer_rmsnorm_backward_{suffix}")
        backward.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, i64, i64, c_int]
        backward.restype = None
    lib.tformer_advise_hugepages.argtypes = [pointer, i64]
    lib.tformer_advise_hugepages.restype = c_int


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
    if _lib is None and not available():
        raise RuntimeError(f"tformer's C kernels are {status()}")
    return _lib


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
