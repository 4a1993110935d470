"""What rotary positions (RoPE) and grouped-query attention (GQA) cost in a tformer block's training step.

    python benchmarks/modern_blocks.py            # d 512, 8 heads, ff 2048, batch 8, S 256 and 1024; ~4 minutes on 2 quiet cores
    python benchmarks/modern_blocks.py --quick    # batch 2, fewer repeats
    python benchmarks/modern_blocks.py --json     # machine-readable

Training step = forward + backward of one Pre-LN block (LayerNorm, sdpa attention, fp32):
``EncoderBlock`` (bidirectional) and ``DecoderBlock(cross_attention=False)`` (causal, a decoder-only
LM's layer). Variants: ``base`` (no rotary, full heads), ``rope`` (``rope=True``, ``cfg.rope_base``),
``gqa`` (``n_kv_heads=2``: 4 query heads per key/value head) and ``rope+gqa``. Learned (or
sinusoidal) positions live in the embedding, outside the block: a block without rotary positions
is what a learned-position model runs, and the LanguageModel table compares ``positions="learned"``
with ``positions="rope"`` end to end (embedding and LM head included).

GQA has fewer FLOPs (the k/v projection shrinks from ``2 d^2`` to ``2 d kv_size`` per token), so
besides raw time each variant's time per FLOP is compared with base's ("at equal FLOPs"); FLOPs are
the matmul FLOPs of the step (3x forward: projections, FFN and the attention products, halved for
causal attention whose upper triangle SDPA's CPU flash kernel skips). RoPE adds only elementwise
work, so its FLOP count is base's.

The GQA section times what ``MultiHeadAttention._expand_kv`` (``repeat_interleave`` of k and v to
the query heads) costs in forward + backward, and checks that SDPA's ``enable_gqa=True`` (which
shares the k/v heads inside the kernel) gives the same outputs and gradients on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tformer
from timing import add_options, apply_options, ratio, rounds

ROOT = Path(__file__).resolve().parent.parent
D, HEADS, D_FF, KV_HEADS = 512, 8, 2048, 2
VARIANTS = {"base": (False, None), "rope": (True, None), "gqa": (False, KV_HEADS), "rope+gqa": (True, KV_HEADS)}
TARGET = 1.05


def block(kind: str, rope: bool, n_kv_heads: int | None) -> nn.Module:
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=D, n_heads=HEADS, d_ff=D_FF, placement="pre", attention="sdpa",
                              n_kv_heads=n_kv_heads)
    if kind == "encoder":
        return tformer.EncoderBlock(cfg, rope=rope).train()
    return tformer.DecoderBlock(cfg, cross_attention=False, rope=rope).train()


def step_flops(batch: int, seq: int, n_kv_heads: int | None, causal: bool) -> float:
    """Matmul FLOPs of one block's training step (3x the forward's)."""
    tokens, head_dim = batch * seq, D // HEADS
    kv_size = (n_kv_heads or HEADS) * head_dim
    projections = 2 * tokens * D * (D + 2 * kv_size) + 2 * tokens * D * D
    ffn = 4 * tokens * D * D_FF
    attention = 4 * batch * seq * seq * D * (0.5 if causal else 1.0)
    return 3 * (projections + ffn + attention)


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run():
        leaf = x.detach().requires_grad_(True)
        module(leaf).backward(grad)
    return run


def measure_blocks(quick: bool) -> list[dict]:
    rows = []
    for seq in (256, 1024):
        batch = 2 if quick else 8
        repeats = (5 if quick else 9) if seq == 256 else (3 if quick else 7)
        torch.manual_seed(1)
        x, grad = torch.randn(batch, seq, D), torch.randn(batch, seq, D)
        for kind in ("encoder", "decoder"):
            steps = {name: train_step(block(kind, rope, kv), x, grad) for name, (rope, kv) in VARIANTS.items()}
            times = rounds(steps, repeats)
            base_flops = step_flops(batch, seq, None, kind == "decoder")
            for name, (rope, kv) in VARIANTS.items():
                flops = step_flops(batch, seq, kv, kind == "decoder")
                time_ratio = ratio(times, name, "base")
                rows.append({"block": kind, "seq": seq, "batch": batch, "variant": name,
                             "ms": statistics.median(times[name]) * 1e3, "time_ratio": time_ratio,
                             "gflop": flops / 1e9, "per_flop_ratio": time_ratio * base_flops / flops})
    return rows


def profile_ops(candidates: dict, steps: int) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per step of every op, per candidate (windows interleaved, median of 3)."""
    windows = {name: [] for name in candidates}
    for _ in range(3):
        for name, step in candidates.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            windows[name].append({e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()})
    result = {}
    for name, ws in windows.items():
        keys = set().union(*ws)
        result[name] = {k: statistics.median(w.get(k, 0.0) for w in ws) for k in keys}
    return result


def rope_profile(quick: bool) -> dict:
    """Where RoPE's extra time goes: per-op self time of the rope decoder block minus base's."""
    batch, seq = (2, 256) if quick else (8, 256)
    torch.manual_seed(1)
    x, grad = torch.randn(batch, seq, D), torch.randn(batch, seq, D)
    ops = profile_ops({name: train_step(block("decoder", rope, None), x, grad)
                       for name, rope in (("base", False), ("rope", True))}, 2)
    base, rope = ops["base"], ops["rope"]
    total_base, total_rope = sum(base.values()), sum(rope.values())
    deltas = sorted(((rope.get(k, 0.0) - base.get(k, 0.0), k) for k in set(base) | set(rope)), reverse=True)
    return {"batch": batch, "seq": seq, "base_ms": total_base, "rope_ms": total_rope,
            "top_deltas": [(k, round(v, 2)) for v, k in deltas[:8]]}


def gqa_attention(quick: bool) -> dict:
    """``repeat_interleave`` + SDPA (what tformer runs) against SDPA's ``enable_gqa=True``, forward + backward,
    in tformer's (batch, seq, heads, head_dim) layout; and whether they agree."""
    batch = 2 if quick else 8
    result = {}
    for seq in (256, 1024):
        for causal in (False, True):
            torch.manual_seed(2)
            head_dim, groups = D // HEADS, HEADS // KV_HEADS
            q = torch.randn(batch, seq, HEADS, head_dim, requires_grad=True)
            k, v = (torch.randn(batch, seq, KV_HEADS, head_dim, requires_grad=True) for _ in range(2))
            k_full, v_full = (torch.randn(batch, seq, HEADS, head_dim, requires_grad=True) for _ in range(2))
            out_grad = torch.randn(batch, seq, HEADS, head_dim)

            def expanded(k=k, v=v):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.repeat_interleave(groups, dim=2).transpose(1, 2),
                    v.repeat_interleave(groups, dim=2).transpose(1, 2), is_causal=causal)

            def native():
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=causal, enable_gqa=True)

            def mha():
                return F.scaled_dot_product_attention(q.transpose(1, 2), k_full.transpose(1, 2),
                                                      v_full.transpose(1, 2), is_causal=causal)

            outputs = {}
            for name, fn in (("expanded", expanded), ("enable_gqa", native)):
                for t in (q, k, v):
                    t.grad = None
                out = fn()
                out.backward(out_grad.transpose(1, 2))
                outputs[name] = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
            differences = [float((a - b).abs().max() / b.abs().max()) for a, b in
                           zip(outputs["enable_gqa"], outputs["expanded"])]

            def fwd_bwd(fn):
                def run():
                    for t in (q, k, v, k_full, v_full):
                        t.grad = None
                    fn().backward(out_grad.transpose(1, 2))
                return run

            times = rounds({"repeat_interleave + sdpa": fwd_bwd(expanded), "sdpa enable_gqa": fwd_bwd(native),
                            "sdpa full heads (MHA)": fwd_bwd(mha)}, (5 if quick else 9) if seq == 256 else (3 if quick else 5))
            result[f"S={seq} {'causal' if causal else 'bidirectional'}"] = {
                "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
                "enable_gqa_vs_expanded": ratio(times, "sdpa enable_gqa", "repeat_interleave + sdpa"),
                "max_rel_difference": {"out": differences[0], "dq": differences[1], "dk": differences[2],
                                       "dv": differences[3]},
            }
    return result


def language_models(quick: bool) -> dict:
    """A 2-layer byte LanguageModel with positions='learned' against positions='rope': training step time."""
    batch, seq = (2, 256) if quick else (8, 256)
    cfg = tformer.BlockConfig(d_model=D, n_heads=HEADS, d_ff=D_FF, placement="pre", attention="sdpa")
    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (batch, seq))
    steps = {}
    for positions in ("learned", "rope"):
        torch.manual_seed(0)
        model = tformer.LanguageModel(cfg, 2, 256, seq, positions=positions).train()

        def run(model=model):
            logits = model(tokens)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        steps[positions] = run
    times = rounds(steps, 5 if quick else 9)
    return {"batch": batch, "seq": seq, "ms": {k: statistics.median(t) * 1e3 for k, t in times.items()},
            "rope_vs_learned": ratio(times, "rope", "learned")}


def convert(quick: bool) -> list[dict]:
    """``benchmarks/convert.py`` (exact LayerNorm -> RMSNorm conversion, inference) at several batch x seq, with
    this process's thread count (its own wall-clock timing, interleaved rounds)."""
    shapes = ((8, 256), (1, 1024)) if quick else ((1, 256), (8, 256), (1, 1024), (8, 1024))
    rows = []
    for batch, seq in shapes:
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert.py"), "--json", "--batch", str(batch),
                              "--seq", str(seq), "--repeats", "3" if quick else "7"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}).stdout
        result = json.loads(out)
        rows.append({"batch": batch, "seq": seq, "model_ratio": result["model_forward"]["ratio"],
                     "norms_ratio": result["norms_alone"]["ratio"],
                     "pre_ln_ms": result["model_forward"]["Pre-LN"] * 1e3,
                     "max_abs_logit_difference": result["max_abs_logit_difference"]})
    return rows


def measure(quick: bool) -> dict:
    return {"threads": torch.get_num_threads(), "blocks": measure_blocks(quick), "rope_profile": rope_profile(quick),
            "gqa_attention": gqa_attention(quick), "language_model": language_models(quick), "convert": convert(quick)}


def report(result: dict) -> tuple[list[str], list[str]]:
    lines = [f"Training step (forward + backward) of one Pre-LN block (LayerNorm, sdpa, fp32), d {D}, {HEADS} heads, "
             f"ff {D_FF}; rope = rotary positions in self-attention, gqa = n_kv_heads {KV_HEADS}; {result['threads']} "
             "threads. Learned positions live in the embedding, outside the block, so 'base' is also the learned-"
             "position block. Ratios: median over round-robin rounds of variant / base; 'per FLOP' divides by the "
             "FLOP ratio (gqa does fewer):", "",
             "| block | batch x S | variant | ms | / base | GFLOP | per FLOP / base |", "|---|---|---|---|---|---|---|"]
    for row in result["blocks"]:
        lines.append(f"| {row['block']} | {row['batch']} x {row['seq']} | {row['variant']} | {row['ms']:.1f} | "
                     f"{row['time_ratio']:.3f} | {row['gflop']:.1f} | {row['per_flop_ratio']:.3f} |")
    lm = result["language_model"]
    lines += ["", f"2-layer byte LanguageModel, batch {lm['batch']} x {lm['seq']}, training step: learned positions "
              f"{lm['ms']['learned']:.1f} ms, rope {lm['ms']['rope']:.1f} ms, rope / learned {lm['rope_vs_learned']:.3f}.",
              ""]
    rp = result["rope_profile"]
    lines += [f"Where RoPE's time goes (decoder block, batch {rp['batch']} x {rp['seq']}, profiler self CPU ms per "
              f"step, rope minus base; base {rp['base_ms']:.1f} ms, rope {rp['rope_ms']:.1f} ms): "
              + ", ".join(f"{k} {v:+.2f}" for k, v in rp["top_deltas"]), ""]
    lines += ["GQA attention alone (q 8 heads, k/v 2 heads, head_dim 64), forward + backward, ms: what tformer runs "
              "(`_expand_kv`: repeat_interleave of k and v, then SDPA) against SDPA's `enable_gqa=True`, and full-"
              "head MHA for scale; 'differs' is the largest relative difference of output and q/k/v gradients:", "",
              "| shape | repeat_interleave + sdpa | sdpa enable_gqa | MHA | enable_gqa / expanded | differs |",
              "|---|---|---|---|---|---|"]
    for shape, r in result["gqa_attention"].items():
        ms = r["ms"]
        lines.append(f"| {shape} | {ms['repeat_interleave + sdpa']:.2f} | {ms['sdpa enable_gqa']:.2f} | "
                     f"{ms['sdpa full heads (MHA)']:.2f} | {r['enable_gqa_vs_expanded']:.3f} | "
                     f"{max(r['max_rel_difference'].values()):.0e} |")
    lines += ["", "Exact LayerNorm -> RMSNorm conversion (`benchmarks/convert.py`, 6-layer Pre-LN LM, d 512, eval, "
              "no_grad):", "", "| batch x seq | Pre-LN forward ms | converted / Pre-LN | norms alone converted / Pre-LN | "
              "max logit diff |", "|---|---|---|---|---|"]
    for row in result["convert"]:
        lines.append(f"| {row['batch']} x {row['seq']} | {row['pre_ln_ms']:.1f} | {row['model_ratio']:.3f} | "
                     f"{row['norms_ratio']:.3f} | {row['max_abs_logit_difference']:.0e} |")
    lines.append("")

    verdicts = []
    for variant in ("rope", "gqa", "rope+gqa"):
        rows = [r for r in result["blocks"] if r["variant"] == variant]
        key = "per_flop_ratio" if "gqa" in variant else "time_ratio"
        worst = max(rows, key=lambda r: r[key])
        ok = worst[key] <= TARGET
        detail = ", ".join(f"{r['block']} S={r['seq']} {r[key]:.3f}" for r in rows)
        verdicts.append(f"{'met' if ok else 'NOT met'}: {variant} block training step "
                        f"{'time per FLOP' if 'gqa' in variant else 'time'} vs base at worst {worst[key]:.3f}x "
                        f"({detail}; target <= {TARGET}x)")
    gqa = result["gqa_attention"]
    verdicts.append("measured: SDPA enable_gqa=True vs repeat_interleave + SDPA (attention fwd+bwd) "
                    + ", ".join(f"{s} {r['enable_gqa_vs_expanded']:.2f}x" for s, r in gqa.items())
                    + f"; same results to {max(max(r['max_rel_difference'].values()) for r in gqa.values()):.0e}")
    verdicts.append("measured: exact LayerNorm -> RMSNorm conversion, LM inference forward "
                    + ", ".join(f"{r['batch']}x{r['seq']} {r['model_ratio']:.3f}x" for r in result["convert"])
                    + " of Pre-LN (no target)")
    return lines, verdicts


def section(quick: bool) -> tuple[list[str], list[str]]:
    return report(measure(quick))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_options(parser).parse_args()
    apply_options(args)
    result = measure(args.quick)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    lines, verdicts = report(result)
    print("\n".join(lines + [f"- {v}" for v in verdicts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
