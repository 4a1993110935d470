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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
