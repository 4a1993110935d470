"""Inference time of a Pre-LN LanguageModel against its exact Pre-RMSNorm conversion.

    python benchmarks/convert.py                    # d 512, 6 layers, batch 8, seq 256, byte vocab; < 1 minute
    python benchmarks/convert.py --repeats 15 --batch 4 --seq 512
    python benchmarks/convert.py --json             # machine-readable

``tformer.convert.layernorm_to_rmsnorm`` turns the model's LayerNorms into RMSNorms with the same
outputs (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers", who report 1-10% less
training and inference time). Both models run in eval mode under ``torch.no_grad`` in one process,
interleaved (each round runs them in alternating order, after one warm-up round), so the shared
machine's drift hits both alike; the table gives median times and the median of the per-round
ratios. A second row times the model's norms alone (the ``2 * n_layers + 1`` norm calls of one
forward at the same activation shape), which bounds what the conversion can save.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys

import torch

import tformer
import tformer.convert
from tformer import kernels

import timing


def build(d_model: int, n_layers: int, seq: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=d_model, n_heads=d_model // 64, d_ff=4 * d_model, norm="layernorm")
    model = tformer.LanguageModel(cfg, n_layers, 256, seq).eval()
    with torch.no_grad():  # trained-looking norms: gains and biases away from 1 and 0 (the head folds the bias)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.1)
    if "head_bias" not in {f.name for f in dataclasses.fields(model.spec)}:
        model.decoder.final_norm.bias.data.zero_()  # this tformer's LM head has no bias to fold it into
    return model, tformer.convert.layernorm_to_rmsnorm(model)


def interleaved(candidates: dict, repeats: int) -> tuple[dict[str, float], float]:
    """Median seconds per candidate and the median per-round ratio second / first (``timing.rounds``)."""
    first, second = candidates
    times = timing.rounds(candidates, repeats)
    return {name: statistics.median(t) for name, t in times.items()}, timing.ratio(times, second, first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    original, converted = build(args.d_model, args.layers, args.seq)
    tokens = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = float((original(tokens) - converted(tokens)).abs().max())

        def forward(model):
            return lambda: model(tokens)

        model_times, model_ratio = interleaved(
            {"Pre-LN": forward(original), "Pre-RMSNorm": forward(converted)}, args.repeats)
        x = torch.randn(args.batch, args.seq, args.d_model)
        n_norms = 2 * args.layers + 1
        layernorm, rmsnorm = original.decoder.final_norm, converted.decoder.final_norm

        def norms(norm):
            return lambda: [norm(x) for _ in range(n_norms)]

        norm_times, norm_ratio = interleaved({"Pre-LN": norms(layernorm), "Pre-RMSNorm": norms(rmsnorm)},
                                             args.repeats * 3)

    results = {"model_forward": {**model_times, "ratio": model_ratio},
               "norms_alone": {**norm_times, "ratio": norm_ratio}, "max_abs_logit_difference": difference}
    if args.json:
        print(json.dumps(results))
        return
    command = " ".join(["python", "benchmarks/convert.py", *map(shlex.quote, sys.argv[1:])])
    print(f"`{command}`: torch {torch.__version__}, {torch.get_num_threads()} threads, C kernels {kernels.status()}; "
          f"LanguageModel d_model {args.d_model}, {args.layers} layers, byte vocab, batch {args.batch}, "
          f"seq {args.seq}, eval + no_grad; median of {args.repeats} interleaved rounds "
          f"({args.repeats * 3} for the norms alone); "
          f"max |logit difference| {difference:.1e}\n")
    print("| what | Pre-LN (ms) | Pre-RMSNorm (ms) | Pre-RMSNorm / Pre-LN |")
    print("|---|---|---|---|")
    print(f"| model forward | {model_times['Pre-LN'] * 1e3:.1f} | {model_times['Pre-RMSNorm'] * 1e3:.1f} | "
          f"{model_ratio:.3f} |")
    print(f"| its {n_norms} norms alone | {norm_times['Pre-LN'] * 1e3:.2f} | {norm_times['Pre-RMSNorm'] * 1e3:.2f} | "
          f"{norm_ratio:.3f} |")


if __name__ == "__main__":
    main()
