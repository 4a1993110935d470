"""Attention backends on CUDA: xformers vs SDPA vs math, forward + backward, dense and padded batches.

    python benchmarks/gpu_attention.py            # skips (exit 0) where no CUDA device exists

Times use CUDA events after warm-up; the padded case drops 25-50% of the tokens of half the batch,
which the xformers backend packs away (block-diagonal bias) and SDPA masks.
"""

from __future__ import annotations

import statistics
import sys

import torch

from tformer.backends import BACKENDS, xformers_unavailable_reason


def time_cuda(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the GPU attention benchmark")
        return 0
    reason = xformers_unavailable_reason(torch.device("cuda"))
    backends = ["sdpa", "math"] + ([] if reason else ["xformers"])
    if reason:
        print(f"xformers not measured: {reason}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':28s} {'padded':7s} " + " ".join(f"{b:>10s}" for b in backends) + "   (ms, fwd+bwd)")
    for batch, seq, heads, dim in ((8, 512, 8, 64), (4, 2048, 16, 64), (2, 8192, 16, 64)):
        for padded in (False, True):
            q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.float16, requires_grad=True)
                       for _ in range(3))
            pad = None
            if padded:
                pad = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
                for b in range(batch // 2):
                    pad[b, seq // 2 + b * seq // (4 * batch):] = True
            row = []
            for name in backends:
                if name == "math" and seq > 4096:
                    row.append("    (skip)")
                    continue

                def run(name=name):
                    out = BACKENDS[name](q, k, v, causal=True, q_padding_mask=pad, kv_padding_mask=pad)
                    out.float().sum().backward()

                row.append(f"{time_cuda(run):10.2f}")
            print(f"{str((batch, seq, heads, dim)):28s} {str(padded):7s} " + " ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
