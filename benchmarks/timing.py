"""Timing shared by the benchmark scripts: candidates run round-robin in one process, and the common options.

Every script times its candidates with :func:`rounds` (or :func:`medians`): one warm-up round, then each
round runs every candidate once, the order alternating between rounds so no candidate always runs right
after the same neighbour (caches, turbo, allocator state). Ratios are taken per round (:func:`ratio`), so a
slow moment of a shared machine hits both sides of a ratio alike.

:func:`add_options` / :func:`apply_options` give every script the same ``--quick``, ``--json``,
``--threads`` and ``--cpu-time`` flags.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

#: the clock the timings read: wall time, or (``--cpu-time``) this process's CPU time, steadier on a shared
#: machine with ``--threads 1`` as time spent waiting for a core is not counted
clock: Callable[[], float] = time.perf_counter


def rounds(candidates: dict[str, Callable[[], object]], repeats: int,
           sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each candidate over ``repeats`` timed rounds after one warm-up round.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before starting and before stopping the clock, for
    devices that run asynchronously."""
    names = list(candidates)
    times = {name: [] for name in names}
    for round_ in range(repeats + 1):
        for name in (names if round_ % 2 else names[::-1]):
            if sync is not None:
                sync()
            start = clock()
            candidates[name]()
            if sync is not None:
                sync()
            if round_:
                times[name].append(clock() - start)
    return times


def medians(candidates: dict[str, Callable[[], object]], repeats: int,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each candidate (see :func:`rounds`)."""
    return {name: statistics.median(t) for name, t in rounds(candidates, repeats, sync).items()}


def ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """``name``'s time / ``base``'s time in each round."""
    return [a / b for a, b in zip(times[name], times[base])]


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time / ``base``'s time in the same round."""
    return statistics.median(ratios(times, name, base))


def add_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> argparse.ArgumentParser:
    """Add ``--quick`` and ``--json`` (and with ``threads``: ``--threads``, ``--cpu-time``) to ``parser``."""
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        parser.add_argument("--cpu-time", action="store_true",
                            help="time with this process's CPU time, not wall time (meaningful with --threads 1)")
    return parser


def apply_options(args: argparse.Namespace) -> None:
    """Set torch's thread count and this module's clock from the options of :func:`add_options`."""
    global clock
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "cpu_time", False):
        clock = time.process_time
