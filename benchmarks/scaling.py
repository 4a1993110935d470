"""How the cost of a training step grows: time and peak memory vs sequence length and vs depth.

    python benchmarks/scaling.py            # S 128..16384, depth 1..16; writes docs/benchmarks/scaling*.{csv,png}
    python benchmarks/scaling.py --quick    # S 128..2048, depth 1..4, into a temporary folder unless --out

Every point runs in a fresh process (so its peak RSS is its own): a Pre-LN encoder stack, d 128,
2 heads, d_ff 512, batch 4 whose rows hold 1/8, 3/8, 5/8 and 7/8 of S real tokens (50% padding),
one training step (forward + backward) as warm-up, then the median of the next ones. Per attention
backend, ``padded`` (``pack_padding = False``: every token, padding included, and a padding mask in
attention) and ``packed`` (real tokens only, each sequence attending on its own). The ``math``
backend materializes the (S, S) scores and stops at S = 4096. The slope printed is the exponent of a
least-squares fit ``cost ~ S^k`` (or ``depth^k``) over the upper half of the points: 2 for
attention's FLOPs, 1 for O(S) memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"
D, HEADS, D_FF, BATCH = 128, 2, 512, 4
MATH_MAX_SEQ = 4096
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large tensors always fresh mmaps: exact peaks

CHILD = r"""
import json, statistics, sys, time, torch, tformer
def peak_kb():  # this process's own peak RSS: ru_maxrss would carry over the parent's peak across exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
seq, depth, backend, mode, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
D, HEADS, D_FF, B = %d, %d, %d, %d
torch.manual_seed(0)
cfg = tformer.BlockConfig(d_model=D, n_heads=HEADS, d_ff=D_FF, placement="pre", attention=backend)
stack = tformer.Encoder(cfg, depth).train()
stack.pack_padding = mode == "packed"
pad = torch.zeros(B, seq, dtype=torch.bool)
for i in range(B):
    pad[i, seq * (2 * i + 1) // (2 * B):] = True
x, grad = torch.randn(B, seq, D), torch.randn(B, seq, D)
def step():
    stack(x.requires_grad_(True), padding_mask=pad).backward(grad)
before = peak_kb()
step()
peak = (peak_kb() - before) / 1024
times = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(times), "peak_mb": peak}))
""" % (D, HEADS, D_FF, BATCH)


def point(seq: int, depth: int, backend: str, mode: str, repeats: int) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(seq), str(depth), backend, mode, str(repeats)],
                         capture_output=True, text=True, env=MALLOC_ENV)
    if run.returncode:
        raise RuntimeError(f"S={seq} depth={depth} {backend} {mode} failed:\n{run.stderr[-2000:]}")
    return {"sweep": "", "seq": seq, "depth": depth, "backend": backend, "mode": mode, **json.loads(run.stdout)}


def slope(rows: list[dict], x: str, y: str) -> float:
    """Least-squares exponent k of ``y ~ x^k`` over the upper half of the points."""
    pts = sorted((r[x], r[y]) for r in rows if r[y] > 0)
    pts = pts[len(pts) // 2:]
    if len(pts) < 2:
        return float("nan")
    xs, ys = [math.log(a) for a, _ in pts], [math.log(b) for _, b in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def run_sweeps(quick: bool, progress=print) -> list[dict]:
    seqs = [128, 256, 512, 1024, 2048] + ([] if quick else [4096, 8192, 16384])
    depths = [1, 2, 4] + ([] if quick else [8, 16])
    repeats = 1 if quick else 2
    jobs = [("seq", s, 2, b, m) for b in ("sdpa", "math") for m in ("padded", "packed") for s in seqs
            if b != "math" or s <= MATH_MAX_SEQ]
    jobs += [("depth", 1024, n, "sdpa", m) for m in ("padded", "packed") for n in depths]
    rows = []
    for i, (sweep, seq, depth, backend, mode) in enumerate(jobs, 1):
        row = point(seq, depth, backend, mode, repeats)
        row["sweep"] = sweep
        rows.append(row)
        progress(f"[{i}/{len(jobs)}] {sweep} sweep: S={seq} depth={depth} {backend} {mode}: "
                 f"{row['seconds'] * 1e3:.0f} ms, {row['peak_mb']:.0f} MB")
    return rows


def curves(rows: list[dict], sweep: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["sweep"] == sweep:
            out.setdefault(f"{r['backend']} {r['mode']}", []).append(r)
    return out


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for sweep, x, label in (("seq", "seq", "sequence length S"), ("depth", "depth", "layers")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, pts in curves(rows, sweep).items():
            xs = [p[x] for p in pts]
            for ax, y in zip(axes, ("seconds", "peak_mb")):
                k = slope(pts, x, y)
                ax.plot(xs, [p[y] for p in pts], marker="o", label=f"{name} (slope {k:.2f})")
        for ax, title in zip(axes, ("training step time (s)", "peak memory growth (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fixed = "depth 2" if sweep == "seq" else "S 1024"
        fig.suptitle(f"Pre-LN encoder, d {D}, batch {BATCH} with 50% padding, {fixed}: training step (fwd + bwd)")
        fig.tight_layout()
        path = out / f"scaling_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(rows: list[dict], out: Path) -> None:
    from tformer.checkpoint import write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "scaling.csv", rows, ["sweep", "seq", "depth", "backend", "mode", "seconds", "peak_mb"])
    plot(rows, out)


def section(quick: bool, out: Path | None = None) -> tuple[list[str], list[str]]:
    out = out or (Path(tempfile.mkdtemp(prefix="tformer-scaling-")) if quick else OUT)
    rows = run_sweeps(quick)
    write(rows, out)
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    lines = [f"Training step (forward + backward) of a Pre-LN encoder, d {D}, {HEADS} heads, d_ff {D_FF}, batch "
             f"{BATCH} with 50% padding, each point in a fresh process (`python benchmarks/scaling.py`; "
             f"`{shown}/scaling.csv`, plots `scaling_seq.png` and `scaling_depth.png`). Slope: the exponent k of "
             "a least-squares fit cost ~ x^k over the upper half of the points.", ""]
    for sweep, x in (("seq", "seq"), ("depth", "depth")):
        lines += [f"![scaling vs {x}]({shown}/scaling_{sweep}.png)", "",
                  f"| {'S' if x == 'seq' else 'layers'} | " + " | ".join(
                      f"{name} ms | {name} MB" for name in curves(rows, sweep)) + " |",
                  "|---|" + "---|---|" * len(curves(rows, sweep))]
        table = curves(rows, sweep)
        for value in sorted({r[x] for r in rows if r["sweep"] == sweep}):
            cells = []
            for pts in table.values():
                p = next((p for p in pts if p[x] == value), None)
                cells += [f"{p['seconds'] * 1e3:.0f}", f"{p['peak_mb']:.0f}"] if p else ["", ""]
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        lines.append("| slope | " + " | ".join(f"{slope(pts, x, 'seconds'):.2f} | {slope(pts, x, 'peak_mb'):.2f}"
                                             for pts in table.values()) + " |")
        lines.append("")
    seq = curves(rows, "seq")
    longest = max(r["seq"] for r in seq["sdpa packed"])
    at = {name: next(p for p in pts if p["seq"] == longest) for name, pts in seq.items() if name.startswith("sdpa")}
    verdicts = [f"measured: training-step scaling, sdpa packed time ~ S^{slope(seq['sdpa packed'], 'seq', 'seconds'):.2f}, "
                f"memory ~ S^{slope(seq['sdpa packed'], 'seq', 'peak_mb'):.2f} (math padded: time "
                f"~ S^{slope(seq['math padded'], 'seq', 'seconds'):.2f}, memory ~ "
                f"S^{slope(seq['math padded'], 'seq', 'peak_mb'):.2f}); at S={longest} packed "
                f"{at['sdpa packed']['seconds'] / at['sdpa padded']['seconds']:.2f}x the padded time"]
    return lines, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for the CSV and PNGs (full default: {OUT})")
    args = parser.parse_args()
    lines, verdicts = section(args.quick, args.out)
    print("\n".join(lines + verdicts))


if __name__ == "__main__":
    main()
