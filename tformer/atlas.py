"""The stability atlas: for each norm x placement, up to which learning rate and depth does training work?

``run_atlas`` trains one small byte-level language model on the embedded corpus per *cell* of a grid
norm x placement x depth x peak learning rate x warmup x seed, and classifies each cell:

- **diverged**: the training loss went non-finite (the step is recorded);
- **stuck**: the final validation loss is no better than the unigram entropy (within ``STUCK_MARGIN``):
  the model learned nothing beyond byte frequencies (this includes runs that blew up to a finite loss);
- **trains**: otherwise, with its final validation loss and bits per byte.

Every cell is the same lean loop (``run_cell``): AdamW (0.9, 0.98), weight decay 0.01, cosine decay to
10% of the peak after a linear warmup, no gradient clipping (clipping would hide the instability the atlas
maps), dropout 0, tformer's default (Xavier) initialization. A cell's result depends only on its
``CellSpec``; results are cached as ``<out>/cells/<key>.json`` (written atomically), so an interrupted
atlas resumes without redoing finished cells and a larger grid reuses a smaller one's cells. ``jobs > 1``
runs cells in that many worker processes (one thread each).

Outputs (``write_atlas``): ``cells.csv`` / ``cells.json`` (every cell), ``stable_lr.csv`` (the largest
stable learning rate per norm x placement x depth x warmup), ``heatmap_depth<D>.png`` per depth and
``summary.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .checkpoint import atomic_write, write_csv
from .config import BlockConfig
from .data import unigram_entropy
from .errors import ConfigError

#: Bump when a cell's computation changes: cached cells of another version are not reused.
ATLAS_VERSION = 1
STUCK_MARGIN = 0.15  # within this of the unigram entropy = learned nothing beyond it (the placement study's rule too)
STATUSES = ("trains", "stuck", "diverged")


@dataclass(frozen=True)
class CellSpec:
    """Everything that determines one atlas cell's result."""

    norm: str
    placement: str
    depth: int
    lr: float
    warmup_steps: int
    seed: int = 0
    steps: int = 120
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 128
    seq_len: int = 64
    batch_size: int = 8
    eval_windows: int = 64
    activation: str = "relu"
    device: str = "cpu"  # "cuda": the same cell on a GPU (its own cache entry: float results differ slightly)

    def key(self) -> str:
        text = json.dumps({"version": ATLAS_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def cost(self) -> float:
        """Relative compute of this cell (for the progress bar's ETA): layers x steps, plus the embedding."""
        return (self.depth + 1) * self.steps

    def block_config(self) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, norm=self.norm,
                           placement=self.placement, activation=self.activation, dropout=0.0)


@dataclass
class AtlasGrid:
    """A grid of cells: the product of the axes, every other ``CellSpec`` field from ``cell``."""

    norms: Sequence[str]
    placements: Sequence[str]
    depths: Sequence[int]
    lrs: Sequence[float]
    warmups: Sequence[int]
    seeds: Sequence[int]
    cell: dict = field(default_factory=dict)

    def cells(self) -> list[CellSpec]:
        return [CellSpec(norm=n, placement=p, depth=d, lr=lr, warmup_steps=w, seed=s, **self.cell)
                for d in self.depths for n in self.norms for p in self.placements
                for lr in self.lrs for w in self.warmups for s in self.seeds]

    def describe(self) -> dict:
        settings = {f.name: f.default for f in fields(CellSpec) if f.default is not MISSING and f.name != "seed"}
        settings.update(self.cell)
        return {"norms": list(self.norms), "placements": list(self.placements), "depths": list(self.depths),
                "lrs": list(self.lrs), "warmups": list(self.warmups), "seeds": list(self.seeds),
                "cell": settings}


#: The committed atlas (docs/atlas): every registered norm under the four classic placements, 2 seeds, about
#: 45 minutes with ``--jobs 2`` on 2 CPU cores (``norms=None``: every registered norm).
DEFAULT_GRID = dict(norms=None, placements=("pre", "post", "sandwich", "deepnorm"), depths=(6, 12),
                    lrs=(3e-3, 1e-2, 3e-2, 1e-1), warmups=(0, 30), seeds=(0, 1))
#: ``--quick``: a corner of the default grid (the same cells, so a later default run reuses them).
QUICK_GRID = dict(norms=("layernorm", "rmsnorm"), placements=("pre", "post", "sandwich"), depths=(6, 12),
                  lrs=(3e-3, 1e-2, 3e-2, 1e-1), warmups=(0, 30), seeds=(0,))


# ------------------------------------------------------------------------------ one cell


def classify(diverged_step: int | None, val_loss: float, entropy: float) -> str:
    """``diverged`` (a non-finite loss), ``stuck`` (no better than the unigram entropy) or ``trains``."""
    if diverged_step is not None or not math.isfinite(val_loss):
        return "diverged"
    return "stuck" if val_loss > entropy - STUCK_MARGIN else "trains"


def run_cell(spec: CellSpec, curve_every: int = 10) -> dict:
    """Train one cell from scratch; its result row (the spec's fields, status, losses, a training-loss curve)."""
    from .data import LMBatches, corpus_splits, eval_windows
    from .models import LanguageModel
    from .schedulers import make_scheduler
    from .training.tasks import token_loss

    start = time.perf_counter()
    train_tokens, val_tokens = corpus_splits()
    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    model = LanguageModel(spec.block_config(), spec.depth, 256, spec.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    scheduler = make_scheduler(optimizer, "cosine", spec.warmup_steps, spec.steps, min_lr_ratio=0.1)
    data = LMBatches(train_tokens, spec.batch_size, spec.seq_len, seed=spec.seed)
    curve, diverged_step, first_loss = [], None, math.nan
    model.train()
    for step in range(1, spec.steps + 1):
        inputs, targets = (t.to(device) for t in data.batch(step))
        loss = token_loss(model(inputs), targets)
        value = loss.item()
        if step == 1:
            first_loss = value
        if not math.isfinite(value):
            diverged_step = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % curve_every == 0 or step == 1:
            curve.append((step, value))
    entropy = unigram_entropy(train_tokens)
    val_loss = math.nan
    if diverged_step is None:
        model.eval()
        with torch.no_grad():
            inputs, targets = (t.to(device) for t in eval_windows(val_tokens, spec.seq_len, spec.eval_windows))
            val_loss = token_loss(model(inputs), targets).item()
        if not math.isfinite(val_loss):
            diverged_step = spec.steps
    return {
        **asdict(spec), "status": classify(diverged_step, val_loss, entropy), "diverged_step": diverged_step, "first_loss": first_loss,
        "final_train_loss": curve[-1][1] if curve and diverged_step is None else math.nan,
        "final_val_loss": val_loss, "final_bits_per_byte": val_loss / math.log(2), "unigram_entropy": entropy,
        "seconds": time.perf_counter() - start, "curve": curve, "version": ATLAS_VERSION,
    }


# ------------------------------------------------------------------------------ the cache and the runner


class CellCache:
    """Finished cells as ``<directory>/<key>.json``, one file per cell, each written atomically."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, spec: CellSpec) -> Path:
        return self.directory / f"{spec.key()}.json"

    def get(self, spec: CellSpec) -> dict | None:
        path = self.path(spec)
        if not path.exists():
            return None
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: recompute (atomic writes make this a foreign file, not a torn one)
        return row if row.get("version") == ATLAS_VERSION and row.get("status") in STATUSES else None

    def put(self, spec: CellSpec, row: dict) -> None:
        atomic_write(self.path(spec), lambda tmp: Path(tmp).write_text(json.dumps(row)))


class AtlasInterrupted(KeyboardInterrupt):
    """Ctrl-C during an atlas: the finished cells are cached; ``done`` of ``total`` cells."""

    def __init__(self, done: int, total: int, cache_dir: Path):
        super().__init__(f"interrupted: {done} of {total} cells are cached in {cache_dir}; "
                         "run the same command to resume")
        self.done, self.total, self.cache_dir = done, total, cache_dir


def _init_worker() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it caches, then stops us
    torch.set_num_threads(1)


def _run_one(item: tuple[Callable[[CellSpec], dict], CellSpec]) -> tuple[CellSpec, dict]:
    runner, spec = item
    return spec, runner(spec)


def _format_spec(spec: CellSpec) -> str:
    return f"{spec.norm}/{spec.placement} L{spec.depth} lr {spec.lr:g} warmup {spec.warmup_steps} seed {spec.seed}"


def run_cells(specs: Iterable[CellSpec], cache_dir: str | Path, *, jobs: int = 1, progress: bool = True,
              desc: str = "atlas", runner: Callable[[CellSpec], dict] = run_cell) -> list[dict]:
    """The result rows of ``specs`` (in order): cached ones read, the others run (in ``jobs`` processes).

    Ctrl-C stops the run with ``AtlasInterrupted`` after caching every finished cell.
    """
    from tqdm.auto import tqdm

    specs = list(dict.fromkeys(specs))
    cache = CellCache(cache_dir)
    results = {spec: cache.get(spec) for spec in specs}
    todo = sorted((s for s in specs if results[s] is None), key=CellSpec.cost, reverse=True)  # longest first
    cached = len(specs) - len(todo)
    bar = tqdm(total=sum(s.cost() for s in todo), desc=desc, unit="layer-step", disable=not progress,
               dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
    done = 0

    def finished(spec: CellSpec, row: dict) -> None:
        nonlocal done
        cache.put(spec, row)
        results[spec] = row
        done += 1
        bar.set_description_str(f"{desc}: cells {cached + done}/{len(specs)} ({cached} cached)", refresh=False)
        bar.set_postfix_str(f"last: {_format_spec(spec)} {row['status']}", refresh=False)
        bar.update(spec.cost())

    bar.set_description_str(f"{desc}: cells {cached}/{len(specs)} ({cached} cached)")
    try:
        if jobs <= 1 or len(todo) <= 1:
            for spec in todo:
                finished(spec, runner(spec))
        else:
            _run_parallel(todo, jobs, runner, finished)
    except KeyboardInterrupt:
        bar.close()
        raise AtlasInterrupted(cached + done, len(specs), cache.directory) from None
    bar.close()
    return [results[s] for s in specs]


def _run_parallel(todo: list[CellSpec], jobs: int, runner, finished) -> None:
    """``todo`` in ``jobs`` spawned processes (longest first, as submitted); leaving the pool, normally or by
    Ctrl-C or an error, terminates the workers, so an interrupted atlas exits at once."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
        for spec, row in pool.imap_unordered(_run_one, [(runner, spec) for spec in todo]):
            finished(spec, row)


def check_grid(grid: AtlasGrid) -> None:
    """Every name and number valid before the first cell runs (a typo fails now, not after an hour)."""
    from . import NORMS, PLACEMENTS

    for name in grid.norms:
        if name not in NORMS:
            raise ConfigError(f"atlas: unknown norm {name!r}; valid: {', '.join(NORMS)}")
    for name in grid.placements:
        if name not in PLACEMENTS:
            raise ConfigError(f"atlas: unknown placement {name!r}; valid: {', '.join(PLACEMENTS)}")
    for axis, values, low in (("depths", grid.depths, 1), ("warmups", grid.warmups, 0), ("seeds", grid.seeds, 0)):
        bad = [v for v in values if not isinstance(v, int) or v < low]
        if bad or not values:
            raise ConfigError(f"atlas: {axis} must be a non-empty list of integers >= {low}, got {list(values)}")
    bad = [lr for lr in grid.lrs if not (isinstance(lr, (int, float)) and 0 < lr < 1)]
    if bad or not grid.lrs:
        raise ConfigError(f"atlas: learning rates must be in (0, 1), got {list(grid.lrs)}")
    device = grid.cell.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"atlas: device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("atlas: device cuda asked for, but torch sees no CUDA device; use --device cpu")
    steps = grid.cell.get("steps", CellSpec.steps)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"atlas: steps per cell must be an integer >= 1, got {steps!r}")
    if any(w >= steps for w in grid.warmups):
        raise ConfigError(f"atlas: every warmup must be shorter than the {steps} steps of a cell, "
                          f"got warmups {list(grid.warmups)}")
    for spec in (CellSpec(n, p, 2, grid.lrs[0], 0, **grid.cell) for n in grid.norms for p in grid.placements):
        try:
            spec.block_config()
        except (ConfigError, ValueError, TypeError) as error:
            raise ConfigError(f"atlas: {spec.norm} x {spec.placement}: {error}") from None


def run_atlas(out_dir: str | Path = "runs/atlas", grid: AtlasGrid | None = None, *, jobs: int = 1,
              progress: bool = True) -> list[dict]:
    """Run (or read from the cache) every cell of ``grid`` and write the atlas's outputs into ``out_dir``.

    ``jobs > 1`` starts worker processes with ``spawn``: in a script, call this under
    ``if __name__ == "__main__":`` (Python re-imports the main module in each worker).
    """
    grid = grid or make_grid()
    check_grid(grid)
    out_dir = Path(out_dir)
    rows = run_cells(grid.cells(), out_dir / "cells", jobs=jobs, progress=progress)
    write_atlas(out_dir, rows, grid)
    return rows


# ------------------------------------------------------------------------------ summaries


def _groups(rows: list[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def cell_summary(seeds: list[dict]) -> dict:
    """One grid cell over its seeds: the status if they agree (else "mixed"), mean loss of the trained seeds."""
    statuses = [r["status"] for r in seeds]
    losses = [r["final_val_loss"] for r in seeds if r["status"] != "diverged"]
    status = statuses[0] if len(set(statuses)) == 1 else "mixed"
    mean = sum(losses) / len(losses) if losses else math.nan
    spread = max(losses) - min(losses) if len(losses) > 1 else math.nan
    return {"status": status, "n_seeds": len(seeds), "n_trains": statuses.count("trains"),
            "mean_val_loss": mean, "seed_spread": spread}


def stable_lr_table(rows: list[dict]) -> list[dict]:
    """Per norm x placement x depth x warmup: the largest learning rate at which every seed trains, and
    whether every smaller learning rate of the grid trains too (``monotone``)."""
    table = []
    for (norm, placement, depth, warmup), group in _groups(rows, ("norm", "placement", "depth", "warmup_steps")).items():
        per_lr = {lr: cell_summary(seeds) for (lr,), seeds in sorted(_groups(group, ("lr",)).items())}
        stable = [lr for lr, s in per_lr.items() if s["status"] == "trains"]
        largest = max(stable) if stable else None
        monotone = largest is not None and all(per_lr[lr]["status"] == "trains" for lr in per_lr if lr <= largest)
        best_lr = min((lr for lr in stable), key=lambda lr: per_lr[lr]["mean_val_loss"], default=None)
        table.append({"norm": norm, "placement": placement, "depth": depth, "warmup_steps": warmup,
                      "largest_stable_lr": largest, "monotone": monotone, "best_lr": best_lr,
                      "best_val_loss": per_lr[best_lr]["mean_val_loss"] if best_lr else math.nan,
                      "n_lrs_stable": len(stable), "n_lrs": len(per_lr)})
    return table


def _fmt_lr(lr) -> str:
    return "-" if lr is None else f"{lr:g}"


def write_atlas(out_dir: Path, rows: list[dict], grid: AtlasGrid) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_fields = [f.name for f in fields(CellSpec)]
    columns = spec_fields + [k for k in rows[0] if k not in spec_fields and k != "curve"]

    write_csv(out_dir / "cells.csv", rows, columns)
    cells = [{k: v for k, v in row.items() if k != "curve"} for row in rows]  # curves stay in the cache
    text = ('{"grid": ' + json.dumps(grid.describe()) + ',\n"cells": [\n' + ",\n".join(json.dumps(c) for c in cells)
            + "\n]}\n")  # one cell per line: small and diffable
    atomic_write(out_dir / "cells.json", lambda tmp: Path(tmp).write_text(text))
    table = stable_lr_table(rows)
    write_csv(out_dir / "stable_lr.csv", table)
    figures = [plot_heatmap(out_dir / f"heatmap_depth{d}.png", rows, grid, d) for d in grid.depths]
    summary = summary_markdown(rows, table, grid, [f.name for f in figures])
    atomic_write(out_dir / "summary.md", lambda tmp: Path(tmp).write_text(summary))


def headline_table(table: list[dict], grid: AtlasGrid) -> list[str]:
    """Markdown: rows norm x placement, columns depth x {no warmup, warmup}: largest stable lr."""
    warmups = list(grid.warmups)
    header = ["norm", "placement"] + [f"L{d} {'no warmup' if w == 0 else f'warmup {w}'}"
                                      for d in grid.depths for w in warmups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    index = {(t["norm"], t["placement"], t["depth"], t["warmup_steps"]): t for t in table}
    for norm in grid.norms:
        for placement in grid.placements:
            cells = []
            for d in grid.depths:
                for w in warmups:
                    t = index.get((norm, placement, d, w))
                    text = _fmt_lr(t["largest_stable_lr"]) if t else "?"
                    if t and t["largest_stable_lr"] is not None and not t["monotone"]:
                        text += "*"
                    cells.append(text)
            lines.append(f"| {norm} | {placement} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows: list[dict], table: list[dict], grid: AtlasGrid, figures: list[str]) -> str:
    g = grid.describe()
    c = g["cell"]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    seconds = sum(r["seconds"] for r in rows)
    entropy = rows[0]["unigram_entropy"]
    lines = [
        "# Stability atlas", "",
        f"{len(rows)} runs: {len(g['norms'])} norms x {len(g['placements'])} placements x depths "
        f"{g['depths']} x peak learning rates {[f'{lr:g}' for lr in g['lrs']]} x warmup {g['warmups']} steps x "
        f"seeds {g['seeds']}. Each run: a byte-level LM on the embedded corpus (d_model {c['d_model']}, "
        f"{c['n_heads']} heads, d_ff {c['d_ff']}, {c['activation']}), {c['steps']} AdamW steps (0.9, 0.98; weight "
        f"decay 0.01) of {c['batch_size']} x {c['seq_len']} bytes, cosine decay to 10% after the warmup, no "
        f"gradient clipping; validation loss on {c['eval_windows']} held-out windows. Unigram entropy "
        f"{entropy:.3f} nats/byte: a run ending above {entropy - STUCK_MARGIN:.3f} is *stuck*, a non-finite loss "
        f"is *diverged*. Status counts: {counts['trains']} trains, {counts['stuck']} stuck, "
        f"{counts['diverged']} diverged; {seconds / 60:.1f} CPU-minutes of cells.", "",
        "## Largest stable learning rate", "",
        f"The largest peak learning rate of the grid at which every seed trains (`-`: none of {_fmt_lr(min(g['lrs']))}"
        f"-{_fmt_lr(max(g['lrs']))} does; `*`: some smaller learning rate fails, so the stable region is not an "
        "interval).", "",
        *headline_table(table, grid), "",
        "## Best cells", "",
        "| depth | warmup | best norm x placement | lr | val loss | bits/byte |", "|---|---|---|---|---|---|",
    ]
    for d in grid.depths:
        for w in grid.warmups:
            candidates = [t for t in table if t["depth"] == d and t["warmup_steps"] == w and t["best_lr"]]
            if candidates:
                best = min(candidates, key=lambda t: t["best_val_loss"])
                lines.append(f"| {d} | {w} | {best['norm']} x {best['placement']} | {best['best_lr']:g} | "
                             f"{best['best_val_loss']:.3f} | {best['best_val_loss'] / math.log(2):.3f} |")
    summaries = [cell_summary(s) for s in _groups(rows, ("norm", "placement", "depth", "lr", "warmup_steps")).values()]
    spreads = sorted(s["seed_spread"] for s in summaries if s["status"] == "trains" and math.isfinite(s["seed_spread"]))
    mixed = sum(s["status"] == "mixed" for s in summaries)
    if spreads:
        lines += ["", f"Seeds: over the {len(spreads)} grid points where every seed trains, the spread (max - min) of "
                      f"the final validation loss between seeds has median {spreads[len(spreads) // 2]:.3f}, 90th "
                      f"percentile {spreads[int(0.9 * (len(spreads) - 1))]:.3f} and maximum {spreads[-1]:.3f}; "
                      f"{mixed} of {len(summaries)} grid points have seeds that disagree on the status (marked k/n in "
                      "the heatmaps)."]
    lines += ["", "## Figures", "", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def plot_heatmap(path: Path, rows: list[dict], grid: AtlasGrid, depth: int) -> Path:
    """Rows norm x placement, columns learning rate, one panel per warmup; colour = mean final validation
    loss over seeds; x = diverged (all seeds), s = stuck, a fraction = seeds that train when they disagree."""
    import numpy as np

    from .analysis.plots import pyplot

    plt = pyplot()
    labels = [f"{n} / {p}" for n in grid.norms for p in grid.placements]
    lrs = list(grid.lrs)
    entropy = rows[0]["unigram_entropy"]
    groups = _groups([r for r in rows if r["depth"] == depth], ("norm", "placement", "warmup_steps", "lr"))
    trained = [r["final_val_loss"] for r in rows if r["status"] == "trains"]
    vmin = min(trained, default=entropy - 1)
    fig, axes = plt.subplots(1, len(grid.warmups), figsize=(2.2 + 1.1 * len(lrs) * len(grid.warmups),
                                                              max(3.6, 1.2 + 0.24 * len(labels))),
                             squeeze=False, sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="#d9d9d9")
    image = None
    for ax, warmup in zip(axes[0], grid.warmups):
        values = np.full((len(labels), len(lrs)), np.nan)
        for i, (n, p) in enumerate((n, p) for n in grid.norms for p in grid.placements):
            for j, lr in enumerate(lrs):
                seeds = groups.get((n, p, warmup, lr))
                if not seeds:
                    continue
                s = cell_summary(seeds)
                if s["status"] != "diverged":
                    values[i, j] = s["mean_val_loss"]
                mark = {"diverged": "x", "stuck": "s", "mixed": f"{s['n_trains']}/{s['n_seeds']}"}.get(s["status"])
                if mark:
                    ax.text(j, i, mark, ha="center", va="center", fontsize=7,
                            color="black" if s["status"] == "diverged" else "white")
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=entropy + 0.3, interpolation="nearest")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(len(grid.placements), len(labels), len(grid.placements)):
            ax.axhline(i - 0.5, color="white", lw=1.5)
        ax.set_xlabel("peak learning rate")
        ax.set_title("no warmup" if warmup == 0 else f"{warmup} warmup steps", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="final validation loss\n(nats/byte, mean over seeds)", shrink=0.8)
    fig.suptitle(f"Stability atlas, {depth} layers: x diverged, s stuck (>= unigram entropy - {STUCK_MARGIN}), "
                 f"k/n seeds train", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_grid(preset: str = "default", **axes) -> AtlasGrid:
    """The ``default`` or ``quick`` grid with any axis replaced (``None`` keeps the preset's;
    ``norms``/``placements`` ``["all"]``: every registered one)."""
    from . import NORMS, PLACEMENTS

    if preset not in ("default", "quick"):
        raise ConfigError(f"atlas: unknown preset {preset!r}; valid: default, quick")
    values = dict(DEFAULT_GRID if preset == "default" else QUICK_GRID)
    cell = axes.pop("cell", None) or {}
    values.update({k: v for k, v in axes.items() if v is not None})
    for axis, registry in (("norms", NORMS), ("placements", PLACEMENTS)):
        if values[axis] is None or list(values[axis]) == ["all"]:
            values[axis] = tuple(registry)
    grid = AtlasGrid(**values, cell=cell)
    check_grid(grid)
    return grid
