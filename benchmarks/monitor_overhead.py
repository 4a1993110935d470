"""Cost of the TrainingMonitor: training steps with it attached (default every=10), after detach, and never attached.

    python benchmarks/monitor_overhead.py [--steps 40] [--rounds 5]

A 4-layer byte-level LM (d_model 128, batch 16 x 128), the lm_small recipe's model. Configurations run
round-robin in one process; the table gives the median time per training step and the ratio to
the never-monitored model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import tformer
from tformer.analysis import TrainingMonitor


def make(seed=0):
    torch.manual_seed(seed)
    cfg = tformer.BlockConfig(d_model=128, n_heads=4, d_ff=512, activation="gelu")
    model = tformer.LanguageModel(cfg, 4, 256, 128)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def run_steps(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for inputs, targets in batches:
        loss = F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per configuration per round (default 40)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, 256, (16, 129), generator=g) for _ in range(args.steps))]
    baseline, twin, attached, detached = make(), make(), make(), make()
    monitor = TrainingMonitor(*attached, every=args.every).attach()
    TrainingMonitor(*detached, every=args.every).attach().detach()
    times = {"never monitored": [], "never monitored, 2nd copy (noise)": [],
             f"monitor attached (every={args.every})": [], "monitor detached": []}
    configs = list(zip(times.values(), (baseline, twin, attached, detached)))
    for round_ in range(args.rounds + 1):
        shift = round_ % len(configs)  # rotate the order so no configuration always runs first
        for series, (model, optimizer) in configs[shift:] + configs[:shift]:
            series.append(run_steps(model, optimizer, batches))
    monitor.detach()
    base = statistics.median(times["never monitored"][1:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds")
    print(f"{'configuration':34s} {'ms/step':>8s} {'ratio':>7s}")
    for name, series in times.items():
        median = statistics.median(series[1:])  # the first round warms up
        print(f"{name:34s} {median * 1e3:8.1f} {median / base:7.3f}")
    print(f"monitor rows per logged step: {len(monitor.rows) // max(1, len({r['step'] for r in monitor.rows}))}")


if __name__ == "__main__":
    main()
