"""Plotting: ``pyplot()`` (matplotlib set up to write files without a display, for every figure tformer
draws) and the plots of a ``TrainingMonitor``'s rows (PNG): update ratio and gradient norm over steps,
residual norm per layer."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend: figures go to files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_monitor(rows: list[dict] | str | Path, out_dir: str | Path, param: str = "ffn.w2") -> list[Path]:
    """Write ``update_ratio.png``, ``grad_norm.png`` (``param`` of every layer over steps) and
    ``residual_norm.png`` (E||x_l||^2/d per layer at the first and last logged steps) into ``out_dir``."""
    plt = pyplot()
    if not isinstance(rows, list):
        rows = load_rows(rows)
    out_dir = Path(out_dir)
    written = []
    for metric, label in (("update_ratio", "||dW|| / ||W|| per step"), ("grad_norm", "gradient norm")):
        series = defaultdict(list)
        for r in rows:
            if r.get("metric") == metric and r.get("param") == param:
                series[(r["stack"], r["layer"])].append((r["step"], r["value"]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        cmap = plt.get_cmap("viridis")
        for i, ((stack, layer), points) in enumerate(sorted(series.items())):
            ax.plot(*zip(*points), color=cmap(i / max(1, len(series) - 1)), label=f"{stack} {layer}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{param}: {label}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    residual = [r for r in rows if r.get("metric") == "residual_norm"]
    if residual:
        steps = sorted({r["step"] for r in residual})
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for step in dict.fromkeys((steps[0], steps[-1])):
            for stack in sorted({r["stack"] for r in residual}):
                points = sorted((r["layer"] + 1, r["value"]) for r in residual if r["step"] == step and r["stack"] == stack)
                ax.plot(*zip(*points), marker="o", label=f"{stack}, step {step}")
        ax.set_xlabel("layer")
        ax.set_ylabel("E||x_l||^2 / d")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "residual_norm.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
