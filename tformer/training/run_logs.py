"""What a run shows and writes as it goes: the progress bar, ``metrics.jsonl`` and the monitor's files.

* ``MetricsLog``: append-only JSONL rows; on resume the rows after the resumed step are dropped,
  so a resumed run's log reads as an uninterrupted one's.
* ``progress_bar``: step count with loss, lr and tokens/s (tqdm; quieter when not on a terminal).
* ``Throughput``: tokens per second since the last logged row.
* ``monitoring``: with ``log.monitor``, a ``TrainingMonitor`` writing ``monitor.jsonl`` during the
  run and its plots after a run that ends normally.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from torch import nn


class MetricsLog:
    """Append-only JSONL of metric rows; on resume, rows after the resumed step are dropped.

    The file is rewritten atomically on resume, so a process killed then loses no row. A row is appended
    in one write; a process killed in the middle of one (or a disk that filled up) leaves a torn last
    line, which the next resume drops. A row that cannot be written raises ``CheckpointError`` naming
    the file and the OS error."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        from ..checkpoint import atomic_write

        rows = []
        if resume_step is not None and path.exists():
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number < len(lines):  # not the torn last line of a killed process: say so
                        warnings.warn(f"{path}, line {number}: not a JSON row; dropped", stacklevel=2)
                    continue
                if not isinstance(row, dict) or row.get("step", 0) <= resume_step:
                    rows.append(line)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in rows)))
        except OSError as error:
            raise _write_error(path, error) from None

    def write(self, row: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as error:
                raise _write_error(self.path, error) from None


def _write_error(path: Path, error: OSError):
    from ..errors import CheckpointError

    return CheckpointError(f"cannot write {path}: {error.strerror or error}")


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled,
                mininterval=0.1 if sys.stderr.isatty() else 5.0)


_PEAKS: dict[tuple[str, str], float] = {}


def measured_peak_flops(device, dtype) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype`` (median of 3; cached per process): the denominator of
    model FLOPs utilization when ``train.peak_tflops`` is 0. The size grows from 256 while one product takes
    under 20 ms, up to 2048, so the measurement stays short where ``dtype`` is slow (bf16 on a CPU without
    AVX-512 BF16 multiplies at ~1 GFLOP/s)."""
    import statistics

    import torch

    def seconds(n: int, repeats: int) -> float:
        a = b = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no random numbers: the run's RNG stays put
        out = torch.empty(n, n, device=device, dtype=dtype)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    key = (str(device), str(dtype))
    if key not in _PEAKS:
        n = 256
        while n < 2048 and seconds(n, 2) < 0.02:
            n *= 2
        _PEAKS[key] = 2 * n**3 / seconds(n, 3)
    return _PEAKS[key]


class Throughput:
    """Tokens counted since the last ``rate()`` call, per second."""

    def __init__(self):
        self.tokens, self.clock = 0, time.perf_counter()

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.clock, 1e-9)
        self.tokens, self.clock = 0, now
        return rate


@contextmanager
def monitoring(enabled: bool, model: nn.Module, optimizer, every: int, run_dir: Path, start: int, write: bool = True):
    """Attach a ``TrainingMonitor`` for the body (when ``enabled``); plot its rows if the body ends normally.
    ``write=False``: measure (collectives included) but write nothing (the other ranks of a sharded run)."""
    if not enabled:
        yield
        return
    from ..analysis import TrainingMonitor
    from ..analysis.plots import plot_monitor

    sink = MetricsLog(run_dir / "monitor.jsonl", write, start if start else None)
    monitor = TrainingMonitor(model, optimizer, every=every, sink=sink.write, start_step=start).attach()
    try:
        yield
    finally:
        monitor.detach()
    if write:
        plot_monitor(run_dir / "monitor.jsonl", run_dir)
