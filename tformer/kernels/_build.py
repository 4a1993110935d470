"""Building, keying, caching and loading the C kernels; ``tformer.kernels`` holds the state and the API.

Nothing here keeps state between calls except a memo of the compiler's ``-march=native``
resolution. ``load()`` is safe to run in several threads or processes at once: every compile
writes a temporary file of its own next to its target and renames it into place, so the cache
only ever holds complete libraries, and a reader never opens a half-written one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ENV_SWITCH = "TFORMER_CPU_KERNELS"
ENV_CACHE = "TFORMER_CACHE_DIR"
SOURCE = Path(__file__).with_name("rmsnorm.c")
#: every C source compiled into the one library (``rmsnorm.c`` holds the ABI number and the helpers);
#: the build key hashes all of them
SOURCES = (SOURCE, SOURCE.with_name("norms.c"))
#: headers the sources include: part of the build's cache key, not of the compile command
HEADERS = (SOURCE.with_name("threads.h"),)
ABI_VERSION = 3
#: the dtype suffixes of the C functions (``tformer.kernels.KERNEL_DTYPES`` maps torch dtypes to them)
SUFFIXES = ("f32", "f64")
# -march=native: the library is built on, and keyed to, the CPU it runs on
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"],
    ["-O3", "-march=native", "-std=c11", "-shared", "-fPIC"],  # compilers without OpenMP (Apple clang)
    ["-O3", "-std=c11", "-shared", "-fPIC"],  # compilers without -march=native
)
#: A build of another key is deleted after a new build once it has gone this long unused (its
#: atime is set on every load): a cache shared between machines keeps each one's build in use.
PRUNE_UNUSED_SECONDS = 24 * 3600
#: A temporary file left by a killed compile is deleted after this long (a live one takes seconds).
PRUNE_TEMPORARY_SECONDS = 3600
_BUILD_NAME = re.compile(r"rmsnorm-[0-9a-f]{16}\.so")
_TEMPORARY_NAME = re.compile(r"\.rmsnorm-[0-9a-f]{16}-[a-z0-9_]+\.tmp")
_FALLBACK = ("RMSNorm on the CPU runs the pure-PyTorch route instead (PyTorch's LayerNorm backward with "
             "the mean at zero: same results, about 1.1-1.3x the time of nn.LayerNorm, which the kernel matches), "
             "and so do DyT, ScaleNorm, AdaNorm, PowerNorm and BatchNorm (same results, 2-10x slower)")


class KernelBuildWarning(UserWarning):
    """The C kernels could not be built or cached as configured (issued once per process)."""


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
        return f"in use ({threads}; {self.reason}: {self.path})"


def switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tformer"


def compiler_command() -> list[str] | None:
    """The C compiler's command: ``$CC`` (may carry arguments, e.g. ``ccache gcc``), else cc, gcc, clang."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cpu_signature() -> str:
    """The machine and its ISA features: the ``flags`` (x86) or ``Features`` (ARM) line of
    /proc/cpuinfo, or on macOS the ``machdep.cpu`` and ``hw.optional`` sysctls."""
    features = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            features = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        if platform.system() == "Darwin":
            features = _output(["sysctl", "machdep.cpu", "hw.optional"])
    return f"{platform.machine()} {platform.processor()} {features.strip()}"


@functools.lru_cache(maxsize=8)
def _native_target(compiler: tuple[str, ...]) -> str:
    """What ``-march=native`` resolves to for this compiler on this CPU, from its driver's ``-###``
    (prints the commands, runs none): gcc's ``-march=znver3 -mavx2 -mno-avx512f ...``, clang's
    ``-target-cpu``/``-target-feature`` pairs; empty when the compiler does not say."""
    text = _output([*compiler, "-march=native", "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull])
    target = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            if token.startswith("-m"):
                target.append(token)
            elif token in ("-target-cpu", "-target-feature") and i + 1 < len(tokens):
                target.append(f"{token} {tokens[i + 1]}")
    return " ".join(target)


def _output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def build_key(source: bytes, compiler: list[str], version: str, flags: list[str]) -> str:
    """16 hex digits naming a build: source, compiler command and version, flags, CPU features and
    ``-march=native``'s resolution, so a cache shared between machines never serves one a binary
    built for instructions its CPU lacks (or built from other source or flags)."""
    parts = [source, shlex.join(compiler).encode(), version.encode(), " ".join(flags).encode(),
             _cpu_signature().encode()]
    if "-march=native" in flags:
        parts.append(_native_target(tuple(compiler)).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def load(*, force: bool = False) -> tuple[ctypes.CDLL | None, KernelStatus, str | None]:
    """``(library or None, status, warning text or None)``: the cached build for this machine, or a
    new one (always a new one with ``force``). No warning when switched off by ``TFORMER_CPU_KERNELS``."""
    if switched_off(ENV_SWITCH):
        return None, KernelStatus(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"), None
    compiler = compiler_command()
    if compiler is None:
        return _failed("no C compiler found (set CC, or install gcc or clang)")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return _failed(f"C compiler {shlex.join(compiler)!r} does not run: {error}")
    source = b"\0".join(path.name.encode() + b"\0" + path.read_bytes() for path in (*SOURCES, *HEADERS))
    names = [(flags, f"rmsnorm-{build_key(source, compiler, version, flags)}.so") for flags in _FLAG_SETS]
    try:
        home = cache_dir()
    except RuntimeError as error:  # Path.home() without HOME or a passwd entry
        home, problem = None, f"no cache directory ({error})"
    errors: list[str] = []
    if home is not None:
        if not force:
            lib, found = _load_cached(home, names, errors)
            if lib is not None:
                return lib, found, None
        problem = _unwritable(home)
    directory, note = home, None
    if problem:  # a temporary directory instead; it may hold a build from an earlier process
        try:
            directory = _temporary_dir()
        except OSError as error:
            return _failed(f"{problem}, and no temporary directory either ({error})")
        note = f"in {directory} ({problem})"
        if not force:
            lib, found = _load_cached(directory, names, errors)
            if lib is not None:
                return lib, _noted(found, note), _cache_warning(problem, directory, "loaded")
    for flags, name in names:
        path = directory / name
        error = _compile(compiler, flags, path)
        if error is None:
            lib, error = _open(path)
        if error is not None:
            errors.append(error)
            continue
        prune(directory, keep=name)
        found = KernelStatus(True, "built", str(path), bool(lib.tformer_kernels_openmp()))
        if note:
            return lib, _noted(found, note), _cache_warning(problem, directory, "built")
        return lib, found, None
    return _failed("building the C kernels failed: " + " | ".join(errors))


def _failed(reason: str) -> tuple[None, KernelStatus, str]:
    return None, KernelStatus(False, reason), (
        f"tformer's C RMSNorm kernel is not in use: {reason}. {_FALLBACK}. To use the kernel, install a "
        f"C compiler (gcc or clang) or set CC to one, and if the cache directory is the problem set "
        f"{ENV_CACHE} to a writable directory; `tformer info --build-kernels` tries again and prints the "
        f"result. {ENV_SWITCH}=0 chooses the pure-PyTorch route without this warning.")


def _cache_warning(problem: str, directory: Path, how: str) -> str:
    return (f"tformer's C RMSNorm kernel: {problem}, so the kernel was {how} in the temporary directory "
            f"{directory} instead. The kernel is in use, but that directory is not kept, so processes may "
            f"build it again; set {ENV_CACHE} to a writable directory to cache it for good.")


def _noted(found: KernelStatus, note: str) -> KernelStatus:
    return KernelStatus(True, f"{found.reason} {note}", found.path, found.openmp)


def _load_cached(directory: Path, names: list[tuple[list[str], str]], errors: list[str]
                 ) -> tuple[ctypes.CDLL | None, KernelStatus | None]:
    """The first cached build in ``names``' order of preference, marked used (atime) for ``prune``."""
    for _, name in names:
        path = directory / name
        if not path.is_file():
            continue
        lib, error = _open(path)
        if error is not None:
            errors.append(error)
            continue
        try:
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
        except OSError:  # a read-only cache: served, just not marked
            pass
        return lib, KernelStatus(True, "loaded from the cache", str(path), bool(lib.tformer_kernels_openmp()))
    return None, None


def _unwritable(directory: Path) -> str | None:
    """Why a build cannot be written into ``directory`` (created if missing), or None if it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        return None
    except OSError as error:
        return f"the cache directory {directory} is not writable ({error.strerror or error})"


def _temporary_dir() -> Path:
    """``$TMPDIR/tformer-kernels-<uid>``, shared by this user's processes, if it is a directory of
    this user's that no one else can write to; else a fresh private one."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    shared = Path(tempfile.gettempdir()) / f"tformer-kernels-{uid if uid is not None else 'user'}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(shared)
        if (stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o022
                and (uid is None or info.st_uid == uid) and _unwritable(shared) is None):
            return shared
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="tformer-kernels-"))


def _compile(compiler: list[str], flags: list[str], path: Path) -> str | None:
    """Compile into a temporary file of this call's own next to ``path``, then rename it into place:
    concurrent builds (threads, torchrun ranks) each write their own file, the rename is atomic."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        return f"cache directory {path.parent}: {error}"
    command = [*compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"]
    shown = shlex.join([*compiler, *flags])  # the source and the temporary name add nothing to a message
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            return f"{shown}: {last}"
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return f"{shown}: {error}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """Load a build and check its ABI version; ``(library, None)`` or ``(None, why not)``."""
    try:
        lib = ctypes.CDLL(str(path))
        if lib.tformer_kernels_abi() != ABI_VERSION:
            raise OSError(f"ABI {lib.tformer_kernels_abi()}, expected {ABI_VERSION}")
        _declare(lib)
        return lib, None
    except (OSError, AttributeError) as error:
        return None, f"loading {path}: {error}"


def prune(directory: Path, keep: str) -> list[str]:
    """Delete other builds (``rmsnorm-<key>.so``) unused for ``PRUNE_UNUSED_SECONDS`` and compile
    temporaries older than ``PRUNE_TEMPORARY_SECONDS`` from ``directory``; nothing else. Returns
    the names deleted."""
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if entry.name == keep:
            continue
        if _BUILD_NAME.fullmatch(entry.name):
            limit = PRUNE_UNUSED_SECONDS
        elif _TEMPORARY_NAME.fullmatch(entry.name):
            limit = PRUNE_TEMPORARY_SECONDS
        else:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and now - max(info.st_mtime, info.st_atime) > limit:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # gone already (another process pruned it), or not ours to delete
            pass
    return removed


def _declare(lib: ctypes.CDLL) -> None:
    pointer, i64, c_int, c_double = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in SUFFIXES:
        forward = getattr(lib, f"tformer_rmsnorm_forward_{suffix}")
        forward.argtypes = [pointer, pointer, pointer, pointer, i64, i64, c_double, c_int]
        forward.restype = None
        backward = getattr(lib, f"tformer_rmsnorm_backward_{suffix}")
        backward.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, i64, i64, c_int]
        backward.restype = None
    signatures = {  # the norms of norms.c: pointers, then counts, then scalars, as in their C definitions
        "dyt_forward": [pointer] * 6 + [i64, i64, c_int],
        "dyt_backward": [pointer] * 7 + [i64, i64, c_int],
        "scalenorm_forward": [pointer] * 4 + [i64, i64, c_double, c_int],
        "scalenorm_backward": [pointer] * 6 + [i64, i64, c_double, c_int],
        "adanorm_forward": [pointer] * 4 + [i64, i64, c_double, c_double, c_double, c_int],
        "adanorm_backward": [pointer] * 5 + [i64, i64, c_double, c_double, c_int],
        "powernorm_stats": [pointer] * 5 + [i64, i64, i64, c_double, c_int],
        "powernorm_forward": [pointer] * 7 + [i64, i64, i64, c_double, c_int],
        "powernorm_backward": [pointer] * 13 + [i64, i64, i64, c_double, c_double, c_double, c_int],
        "batchnorm_stats": [pointer] * 5 + [i64, i64, c_int],
        "batchnorm_forward": [pointer] * 5 + [i64, i64, c_int],
        "batchnorm_backward": [pointer] * 6 + [c_double] + [pointer] * 6 + [i64, i64, c_int],
    }
    for suffix in SUFFIXES:
        for name, argtypes in signatures.items():
            function = getattr(lib, f"tformer_{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
    lib.tformer_advise_hugepages.argtypes = [pointer, i64]
    lib.tformer_advise_hugepages.restype = c_int
