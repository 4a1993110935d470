"""Forward+backward time of every registered norm against torch.nn.LayerNorm, measured in one run.

    python benchmarks/norms.py                 # (8, 2048, 1024), 7 repeats
    python benchmarks/norms.py --shape 8 256 512 --repeats 11

Prints the median time per norm and its ratio to ``nn.LayerNorm`` (the fused kernel) and to
``nn.RMSNorm`` measured in the same process, so the shared machine's noise cancels out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import tformer


def time_fwd_bwd(norm: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    leaf = x.detach().requires_grad_(True)
    start = time.perf_counter()
    norm(leaf).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 2048, 1024], metavar=("B", "S", "D"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    batch, seq, d = args.shape
    torch.manual_seed(0)
    x, grad = torch.randn(batch, seq, d), torch.randn(batch, seq, d)
    candidates = {"nn.LayerNorm": nn.LayerNorm(d), "nn.RMSNorm": nn.RMSNorm(d, eps=1e-5)}
    for name in tformer.NORMS:
        if name != "none":
            candidates[f"tformer {name}"] = tformer.make_norm(name, d)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for repeat in range(args.repeats + 1):  # round-robin, so drift on a shared machine hits all alike
        for name, norm in candidates.items():
            seconds = time_fwd_bwd(norm, x, grad)
            if repeat:  # the first round warms up the allocator and kernels
                times[name].append(seconds)
    results = {name: statistics.median(t) for name, t in times.items()}
    ln, rms = results["nn.LayerNorm"], results["nn.RMSNorm"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {tuple(args.shape)}, "
          f"median of {args.repeats}")
    print(f"{'norm':22s} {'ms':>8s} {'/ LayerNorm':>12s} {'/ nn.RMSNorm':>13s}")
    for name, seconds in results.items():
        print(f"{name:22s} {seconds * 1e3:8.1f} {seconds / ln:12.2f} {seconds / rms:13.2f}")


if __name__ == "__main__":
    main()
