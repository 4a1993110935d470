"""The ``tformer`` command line (also ``python -m tformer``)."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import tformer
    from tformer.backends import resolve_backend

    probe = torch.zeros(1, 1, 1, 8, device=args.device)
    print(f"tformer {tformer.__version__}, torch {torch.__version__}")
    print(f"norms:       {', '.join(tformer.NORMS)} (and 'deepnorm' = layernorm + deepnorm placement)")
    print(f"placements:  {', '.join(tformer.PLACEMENTS)}")
    print(f"activations: {', '.join(tformer.ACTIVATIONS)}")
    print(f"attention:   {', '.join(tformer.BACKENDS)}; 'auto' runs {resolve_backend('auto', probe)!r} on {args.device}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from tformer.grid import grid_markdown, run_grid

    rows = run_grid(d_model=args.d_model, n_layers=args.layers, attention=args.attention)
    print(f"Residual-stream RMS after a {args.layers}-layer encoder at initialization "
          f"(d_model={args.d_model}, attention={args.attention!r}); every cell also ran a decoder "
          f"with cross-attention forward and backward:\n")
    print(grid_markdown(rows))
    failed = [r for r in rows if not (r.finite and r.all_params_get_grad)]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} combinations ran with finite outputs and "
          f"gradients for every parameter ({sum(r.seconds for r in rows):.1f} s).")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tformer",
        description="Transformer blocks where the placement of normalization is a first-class design axis.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="list the registered norms, placements and attention backends",
                               description="List the registered norms, placements, activations and attention "
                                           "backends, and which backend attention='auto' picks on a device.")
    info.add_argument("--device", default="cpu", help="device to resolve attention='auto' for (default: cpu)")
    info.set_defaults(run=_info)

    grid = commands.add_parser("grid", help="run every norm x placement combination once and print the grid",
                               description="Build a small encoder and decoder for every registered norm x "
                                           "placement, run forward and backward on padded random data, and print "
                                           "the residual-stream RMS at initialization as a markdown table. "
                                           "Exits non-zero if any combination gives non-finite values or leaves "
                                           "a parameter without a gradient.")
    grid.add_argument("--d-model", type=int, default=64, help="model width (default: 64)")
    grid.add_argument("--layers", type=int, default=6, help="layers per stack (default: 6)")
    grid.add_argument("--attention", default="auto", help="attention backend (default: auto)")
    grid.set_defaults(run=_grid)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
