"""Forward+backward time of every norm, and of every way to compute RMSNorm, in one run.

    python benchmarks/norms.py                       # (8, 2048, 1024), 7 repeats
    python benchmarks/norms.py --shape 8 256 512 --repeats 11
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/norms.py   # PyTorch's huge-page allocation
    python benchmarks/norms.py --json                # machine-readable (benchmarks/run.py uses it)

Prints the median time per candidate and its ratio to ``nn.LayerNorm`` (the fused kernel)
measured in the same process, so the shared machine's noise cancels out. The RMSNorm options:

- ``nn.RMSNorm``: PyTorch's composite (no fused CPU kernel);
- ``torch.compile(nn.RMSNorm)``: inductor's generated C++ (compile time excluded);
- ``tformer rmsnorm, LayerNorm-backward route``: ``RMSNormFunction``, used without a compiler;
- ``tformer rmsnorm``: the default, the C kernel of ``tformer.kernels``, which asks for huge
  pages on outputs over 32 MiB; ``tformer rmsnorm, no huge-page advice``: the same kernel without.

Every registered norm has a ``tformer <name>`` row (training mode, no padding mask: PowerNorm and
BatchNorm use batch statistics). DyT, ScaleNorm, AdaNorm, PowerNorm and BatchNorm run their C kernels
(``tformer.fused_norms``) there; their ``tformer <name>, composite route`` rows are the same module on
its pure-PyTorch route (what runs without a compiler, on other dtypes and devices). The text output
ends with each norm's ratio against the target of issue 13 (<= 1.5x nn.LayerNorm).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import tformer
from tformer import fused_norms, kernels
from tformer.rmsnorm import RMSNormFunction

#: the norms with C kernels in tformer.fused_norms, and the target of issue 13 for them
FUSED = ("dyt", "scalenorm", "adanorm", "powernorm", "batchnorm")
TARGET = 1.5


class LayerNormRouteRMSNorm(nn.Module):
    """tformer's RMSNorm forced onto its no-compiler route."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, 1e-5)


def forward_backward(norm: nn.Module, hugepages: bool = True):
    """One forward+backward of ``norm``; ``hugepages=False`` runs the C kernel without its madvise."""
    def run(x: torch.Tensor, grad: torch.Tensor) -> None:
        saved = kernels._hugepages
        kernels._hugepages = saved and hugepages
        try:
            norm(x).backward(grad)
        finally:
            kernels._hugepages = saved
    return run


def composite_route(norm: nn.Module):
    """One forward+backward of ``norm`` with the fused kernels switched off (its pure-PyTorch route)."""
    def run(x: torch.Tensor, grad: torch.Tensor) -> None:
        saved = fused_norms._kernels_available
        fused_norms._kernels_available = lambda: False
        try:
            norm(x).backward(grad)
        finally:
            fused_norms._kernels_available = saved
    return run


def candidates(d: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    norms = {"nn.LayerNorm": nn.LayerNorm(d), "nn.RMSNorm": nn.RMSNorm(d, eps=1e-5),
             "torch.compile(nn.RMSNorm)": torch.compile(nn.RMSNorm(d, eps=1e-5), dynamic=False),
             "tformer rmsnorm, LayerNorm-backward route": LayerNormRouteRMSNorm(d)}
    norms.update({f"tformer {name}": tformer.make_norm(name, d) for name in tformer.NORMS if name != "none"})
    runs = {name: forward_backward(norm) for name, norm in norms.items()}
    for name in FUSED:
        if name in tformer.NORMS:
            runs[f"tformer {name}, composite route"] = composite_route(tformer.make_norm(name, d))
    kernels.available()  # load now, so the variant below knows whether huge pages are on
    if kernels._hugepages:
        runs["tformer rmsnorm, no huge-page advice"] = forward_backward(norms["tformer rmsnorm"], hugepages=False)
    return runs


def measure(shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Median seconds of forward+backward per candidate, after one warm-up round.

    Every round runs all candidates in a fresh random order: drift on a shared machine hits all
    alike, and each timed call follows an untimed call of the same candidate (what ran just before
    changes the allocator's and the caches' state: with a fixed order some ratios moved by 20%).
    """
    torch.manual_seed(0)
    x, grad = torch.randn(shape), torch.randn(shape)
    norms = candidates(shape[-1])
    times: dict[str, list[float]] = {name: [] for name in norms}
    order = random.Random(0)
    for repeat in range(repeats + 1):  # the first round warms up the allocator, kernels and compiler
        names = list(norms)
        order.shuffle(names)
        for name in names:
            for timed in (False, True):  # an untimed call first: the state the previous one left
                leaf = x.detach().requires_grad_(True)
                start = time.perf_counter()
                norms[name](leaf, grad)
                if repeat and timed:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 2048, 1024], metavar=("B", "S", "D"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print {candidate: seconds} as JSON")
    args = parser.parse_args()
    results = measure(tuple(args.shape), args.repeats)
    if args.json:
        print(json.dumps(results))
        return
    ln = results["nn.LayerNorm"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {tuple(args.shape)}, "
          f"median of {args.repeats}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; "
          f"C kernels {kernels.status()}")
    print(f"{'candidate':42s} {'ms':>8s} {'/ LayerNorm':>12s}")
    for name, seconds in results.items():
        print(f"{name:42s} {seconds * 1e3:8.2f} {seconds / ln:12.2f}")
    noise = abs(results["tformer layernorm"] / ln - 1.0)
    print(f"target <= {TARGET}x nn.LayerNorm (the same LayerNorm kernel twice differs by {noise:.2f}: the noise):")
    for name in FUSED:
        if f"tformer {name}" in results:
            ratio = results[f"tformer {name}"] / ln
            print(f"  {'met' if ratio <= TARGET else 'NOT met'}: {name} {ratio:.2f}x "
                  f"(composite route {results[f'tformer {name}, composite route'] / ln:.2f}x)")


if __name__ == "__main__":
    main()
