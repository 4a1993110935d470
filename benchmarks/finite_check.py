"""Cost of tformer's debug checks (``tformer.set_debug_checks``): a Pre-LN stack's forward with them off,
with ``"inputs"`` (the stack's input checked for NaN/inf once) and with ``"blocks"`` (every block's output too).

    python benchmarks/finite_check.py [--layers 6] [--calls 10] [--rounds 7] [--train] [--quick] [--json] [--threads N]

An ``Encoder`` of ``--layers`` Pre-LN LayerNorm blocks (d_model 512, 8 heads, d_ff 2048) on a batch of
8 x 256, in eval mode under ``torch.no_grad`` (``--train``: training mode with autograd recording, no
backward). The modes run round-robin in one process (``benchmarks/timing.py``: order alternating between rounds,
after one warm-up round); each round times ``--calls`` forwards per mode. The table gives the median time per forward and the
median of the per-round ratios to "off" (so a slow moment of a shared machine hits both sides of a ratio);
"off, again" is the same configuration timed twice, the noise floor. Run it on an idle machine.
``--quick`` (d_model 64, batch 2 x 32, 2 layers, 2 rounds) only checks that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from typing import Callable

import torch

import tformer
import timing


def forward(stack: torch.nn.Module, x: torch.Tensor, calls: int, mode, train: bool) -> Callable[[], None]:
    """A candidate for :func:`timing.rounds`: ``calls`` forwards of ``stack`` on ``x`` under debug-check ``mode``."""
    def run() -> None:
        grad = contextlib.nullcontext() if train else torch.no_grad()
        with tformer.debug_checks(mode), grad:
            for _ in range(calls):
                stack(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--calls", type=int, default=10, help="forwards per mode per round (default 10)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round (default 7)")
    parser.add_argument("--train", action="store_true", help="training mode with autograd recording")
    timing.add_options(parser)
    args = parser.parse_args()
    timing.apply_options(args)
    if args.quick:
        args.d_model, args.batch, args.seq, args.layers, args.calls, args.rounds = 64, 2, 32, 2, 2, 2
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=args.d_model, n_heads=8, d_ff=4 * args.d_model, norm="layernorm",
                              placement="pre")
    stack = tformer.Encoder(cfg, args.layers).train(args.train)
    x = torch.randn(args.batch, args.seq, args.d_model)
    modes = {"off": False, "off, again (noise)": False, "inputs": "inputs", "blocks": "blocks"}
    times = timing.rounds({name: forward(stack, x, args.calls, mode, args.train) for name, mode in modes.items()},
                          args.rounds)
    results = {name: {"ms_per_forward": statistics.median(series) / args.calls * 1e3,
                      "ratio_to_off": timing.ratio(times, name, "off")} for name, series in times.items()}
    if args.json:
        print(json.dumps(results))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Pre-LN Encoder, {args.layers} layers, "
          f"d_model {args.d_model}, batch {args.batch} x {args.seq}, {'training' if args.train else 'eval, no_grad'}; "
          f"{args.calls} forwards x {args.rounds} rounds")
    print(f"{'debug checks':20s} {'ms/forward':>11s} {'ratio to off':>13s}")
    for name, row in results.items():
        print(f"{name:20s} {row['ms_per_forward']:11.2f} {row['ratio_to_off']:13.3f}")


if __name__ == "__main__":
    main()
