"""torch.compile vs eager for a tformer block's training step on CUDA (the CPU side is benchmarks/compile_profile.py).

    python benchmarks/gpu_compile.py            # skips (exit 0) where no CUDA device exists
    python benchmarks/gpu_compile.py --json

A Pre-LN ``EncoderBlock`` and a causal ``DecoderBlock(cross_attention=False)`` (LayerNorm, sdpa, d 512,
8 heads, ff 2048, batch 8, S 256 and 1024) run forward + backward eagerly and under
``torch.compile(fullgraph=True)`` (default mode and ``mode="max-autotune-no-cudagraphs"``), in fp32
and under bf16 autocast. Times use CUDA events after warm-up, candidates interleaved round-robin,
medians; the speed-up is eager / compiled in the same round.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch

import tformer

MODES = {"compile (default)": {}, "compile max-autotune-no-cudagraphs": {"mode": "max-autotune-no-cudagraphs"}}


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(repeats: int = 20) -> dict:
    results = []
    for kind in ("encoder", "decoder"):
        for seq in (256, 1024):
            for precision in ("fp32", "bf16"):
                torch.manual_seed(0)
                cfg = tformer.BlockConfig(d_model=512, n_heads=8, d_ff=2048, placement="pre", attention="sdpa")
                block = (tformer.EncoderBlock(cfg) if kind == "encoder"
                         else tformer.DecoderBlock(cfg, cross_attention=False)).cuda().train()
                x, grad = torch.randn(8, seq, 512, device="cuda"), torch.randn(8, seq, 512, device="cuda")
                modules = {"eager": copy.deepcopy(block)}
                for name, kwargs in MODES.items():
                    torch._dynamo.reset()
                    modules[name] = torch.compile(copy.deepcopy(block), fullgraph=True, **kwargs)

                def step(module):
                    def run():
                        leaf = x.detach().requires_grad_(True)
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                            out = module(leaf)
                        out.backward(grad.to(out.dtype))
                    return run

                steps = {name: step(m) for name, m in modules.items()}
                for run in steps.values():  # compile and warm up
                    for _ in range(3):
                        run()
                torch.cuda.synchronize()
                times = {name: [] for name in steps}
                for _ in range(repeats):
                    for name, run in steps.items():
                        times[name].append(cuda_ms(run))
                row = {"block": kind, "seq": seq, "precision": precision,
                       "ms": {name: statistics.median(t) for name, t in times.items()}}
                row["speedup"] = {name: statistics.median(e / c for e, c in zip(times["eager"], t))
                                  for name, t in times.items() if name != "eager"}
                results.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        message = "no CUDA device: skipping the GPU compile benchmark"
        print(json.dumps({"skipped": message}) if args.json else message)
        return 0
    result = measure(args.repeats)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['device']}, torch {result['torch']}: training step (forward + backward), batch 8, d 512, ms\n")
    names = list(result["rows"][0]["ms"])
    print("| block | S | precision | " + " | ".join(names) + " | best speed-up |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for row in result["rows"]:
        print(f"| {row['block']} | {row['seq']} | {row['precision']} | "
              + " | ".join(f"{row['ms'][n]:.2f}" for n in names) + f" | {max(row['speedup'].values()):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
