"""The lm_small recipe end to end in float32 and in bf16 autocast: time per step and validation loss.

    python benchmarks/precision.py                  # 200 steps of each; minutes where bf16 is fast
    python benchmarks/precision.py --steps 20       # a smoke run
    python benchmarks/precision.py --json

Both runs train the model of ``recipes/configs/lm_small.yaml`` (4 layers, d 128, byte-level, seq 256,
batch 8) with the same seed, data and schedule (cosine over ``--steps``), in this one process, one after
the other, and report seconds per step (from the run's own metrics, the first logged interval dropped),
the ratio, the final validation loss of each and their relative difference. The bf16 run keeps
parameters, AdamW state and the loss in float32 (``train.precision=bf16``).

Also printed: this CPU's matmul rates in both dtypes. bf16 only pays off where the CPU multiplies bf16
natively (AVX-512 BF16 or AMX); on an AVX2-only CPU bf16 matmuls are emulated and far slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tformer.recipe_config import load_config
from tformer.training import recipe_defaults, train
from tformer.training.run_logs import measured_peak_flops

ROOT = Path(__file__).resolve().parent.parent


def run(precision: str, steps: int, out: Path) -> dict:
    config = load_config(recipe_defaults("lm"), ROOT / "recipes" / "configs" / "lm_small.yaml", [
        f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}", f"log.every={max(1, steps // 10)}",
        f"log.eval_every={steps}", "log.checkpoint_every=0", "log.progress=false", f"out_dir={out}",
        f"run={precision}", f"train.precision={precision}"])
    result = train(config)
    rows = [json.loads(line) for line in (out / precision / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first interval includes start-up
    tokens_per_step = config["train"]["batch_size"] * config["data"]["seq_len"]
    return {"precision": precision, "seconds_per_step": tokens_per_step / statistics.median(rates),
            "final_val_loss": result.final["val_loss"]}


def compare(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fp32, bf16 = run("fp32", steps, Path(tmp)), run("bf16", steps, Path(tmp))
    return {
        "steps": steps, "threads": torch.get_num_threads(),
        "matmul_gflops": {"float32": measured_peak_flops(torch.device("cpu"), torch.float32) / 1e9,
                          "bfloat16": measured_peak_flops(torch.device("cpu"), torch.bfloat16) / 1e9},
        "fp32": fp32, "bf16": bf16,
        "speedup": fp32["seconds_per_step"] / bf16["seconds_per_step"],
        "val_loss_rel_diff": (bf16["final_val_loss"] - fp32["final_val_loss"]) / fp32["final_val_loss"],
    }


def table(r: dict) -> list[str]:
    return [
        f"lm_small recipe, {r['steps']} steps each, {r['threads']} threads; matmul rates: float32 "
        f"{r['matmul_gflops']['float32']:.1f} GFLOP/s, bfloat16 {r['matmul_gflops']['bfloat16']:.1f} GFLOP/s", "",
        "| precision | s/step | speed-up | final val loss |", "|---|---|---|---|",
        f"| fp32 | {r['fp32']['seconds_per_step']:.3f} | 1.00 | {r['fp32']['final_val_loss']:.4f} |",
        f"| bf16 autocast | {r['bf16']['seconds_per_step']:.3f} | {r['speedup']:.2f} | "
        f"{r['bf16']['final_val_loss']:.4f} ({r['val_loss_rel_diff']:+.2%}) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare(args.steps)
    print(json.dumps(result, indent=1) if args.json else "\n".join(table(result)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
