"""Ba et al. (2016), Table 1, measured: what each norm's output is invariant to.

A norm ``f`` acts on the summed inputs ``a = x W^T`` of a linear layer (no bias: the norm's own bias
follows it). ``measure_invariances`` applies each of Ba et al.'s six transformations to ``W`` or to the
data ``x`` and reports the largest change of the norm's output, relative to the output's scale:

- weight matrix re-scaling ``W -> d W``;
- weight matrix re-centering ``W -> W + 1 c^T`` (every unit's incoming weights shifted by one vector);
- weight vector re-scaling ``W_i -> d_i W_i`` (each unit by its own factor);
- dataset re-scaling ``x -> d x`` (every example);
- dataset re-centering ``x -> x + c`` (one vector for every example and position);
- single training case re-scaling ``x_n -> d_n x_n`` (each example, i.e. sequence, by its own factor).

An entry is *invariant* when the output changes by less than ``TOLERANCE`` (float64; the norms' eps
terms leave changes around 1e-6). Norms that use batch statistics (BatchNorm, PowerNorm) are measured
in training mode, where the paper's table places BatchNorm, and again in evaluation mode (running
statistics, after a few training batches set them); PowerNorm also without its group scaling and after
its warmup (when its training forward, too, divides by the running statistic). Weight normalization
(``torch.nn.utils.parametrizations.weight_norm``, which re-parametrizes ``W`` rather than normalizing
``a``) is measured as the paper's third row, with the transformations applied to its direction ``v``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import write_csv

TRANSFORMS = (
    "weight matrix re-scaling", "weight matrix re-centering", "weight vector re-scaling",
    "dataset re-scaling", "dataset re-centering", "single training case re-scaling",
)
#: Ba et al. 2016, Table 1 (True: invariant), the rows the measurement is checked against.
PAPER = {
    "batch norm": (True, False, True, True, True, False),
    "weight norm": (True, False, True, False, False, False),
    "layer norm": (True, True, False, True, False, True),
}
#: Which measured row each paper row is checked against.
PAPER_ROWS = {"batch norm": "batchnorm", "weight norm": "weight norm (reference)", "layer norm": "layernorm"}
TOLERANCE = 1e-4


def _transformed(transform: str, x: Tensor, w: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    d_out, d_in = w.shape

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=x.dtype)

    if transform == "weight matrix re-scaling":
        return x, 3.7 * w
    if transform == "weight matrix re-centering":
        return x, w + torch.ones(d_out, 1, dtype=w.dtype) * torch.randn(1, d_in, generator=generator, dtype=w.dtype)
    if transform == "weight vector re-scaling":
        return x, w * (0.5 + 3 * rand(d_out, 1))
    if transform == "dataset re-scaling":
        return 3.7 * x, w
    if transform == "dataset re-centering":
        return x + torch.randn(d_in, generator=generator, dtype=x.dtype), w
    if transform == "single training case re-scaling":
        return x * (0.5 + 3 * rand(x.shape[0], 1, 1)), w
    raise ValueError(f"unknown transformation {transform!r}; valid: {', '.join(TRANSFORMS)}")


def _relative_change(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def measure_invariances(norm: nn.Module, *, d_out: int = 32, d_in: int = 48, batch: int = 8, seq: int = 16,
                        seed: int = 0, weight_norm: bool = False) -> dict[str, float]:
    """The relative output change of ``norm(x W^T)`` under each transformation (float64, fresh copies of
    ``norm`` so running statistics never carry over). ``weight_norm=True``: ``norm`` is ignored and the
    layer is ``weight_norm(nn.Linear)``, transformed through its direction ``v``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d_in, generator=generator, dtype=torch.float64) + 0.5
    w = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) / d_in ** 0.5
    if weight_norm:
        layer = nn.utils.parametrizations.weight_norm(nn.Linear(d_in, d_out, bias=False).double())
        with torch.no_grad():
            layer.parametrizations.weight.original0.copy_(1 + torch.rand(d_out, 1, generator=generator,
                                                                          dtype=torch.float64))

        def run(x_: Tensor, v: Tensor) -> Tensor:
            with torch.no_grad():
                layer.parametrizations.weight.original1.copy_(v)
                return layer(x_)
    else:
        def run(x_: Tensor, w_: Tensor) -> Tensor:
            with torch.no_grad():
                return copy.deepcopy(norm)(x_ @ w_.T)

    reference = run(x, w)
    return {t: _relative_change(reference, run(*_transformed(t, x, w, generator))) for t in TRANSFORMS}


def _randomized(norm: nn.Module, seed: int) -> nn.Module:
    """``norm`` in float64 with random affine parameters (so no invariance comes from identity gains)."""
    generator = torch.Generator().manual_seed(seed)
    norm = norm.double()
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype))
    return norm


def _with_running_statistics(norm: nn.Module, seed: int, d: int = 32, d_in: int = 48) -> nn.Module:
    """Train-mode forwards on a few batches (so the running statistics move off their initial values)."""
    generator = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(d, d_in, generator=generator, dtype=torch.float64) / d_in ** 0.5
    norm.train()
    with torch.no_grad():
        for _ in range(20):
            norm(torch.randn(8, 16, d_in, generator=generator, dtype=torch.float64) @ w.T + 0.3)
    return norm


def norm_variants(d_model: int = 32, n_heads: int = 4, seed: int = 0) -> list[tuple[str, Callable[[], nn.Module]]]:
    """(label, factory) for every registered norm as blocks build it (training mode), plus evaluation-mode
    rows for the norms that use batch statistics and PowerNorm's other regimes."""
    from ..norms import NORMS, block_defaults, make_norm, norm_traits

    variants = []
    for name in NORMS:
        options = block_defaults(NORMS[name], d_model, n_heads)

        def build(name=name, options=options, mode="train"):
            norm = _randomized(make_norm(name, d_model, **options), seed)
            return norm.train() if mode == "train" else _with_running_statistics(norm, seed).eval()

        variants.append((name, build))
        if norm_traits(name).uses_batch_statistics:
            variants.append((f"{name} (eval: running statistics)", lambda build=build: build(mode="eval")))
    if "powernorm" in NORMS:
        variants.append(("powernorm (no group scaling)",
                         lambda: _randomized(make_norm("powernorm", d_model, group_num=0), seed).train()))
        variants.append(("powernorm (no group scaling, after warmup)",
                         lambda: _with_running_statistics(
                             _randomized(make_norm("powernorm", d_model, group_num=0, warmup_iters=0), seed), seed)))
    return variants


def invariance_table(seed: int = 0) -> list[dict]:
    """One row per norm variant (and weight normalization): the relative output change per transformation."""
    rows = []
    for label, build in norm_variants(d_model=32, seed=seed):
        rows.append({"norm": label, **measure_invariances(build(), d_out=32, seed=seed)})
    rows.append({"norm": "weight norm (reference)",
                 **measure_invariances(nn.Identity(), d_out=32, seed=seed, weight_norm=True)})
    return rows


#: Column names of the yes/no table (API.md: ``tformer analyze invariance --out DIR`` writes DIR/invariance.csv).
COLUMNS = ("weight_matrix_rescaling", "weight_matrix_recentering", "weight_vector_rescaling", "dataset_rescaling",
           "dataset_recentering", "single_case_rescaling")


def write_yes_no(path: Path, rows: list[dict]) -> None:
    """One row per registered norm (training mode, as blocks build it): ``norm`` then yes/no per transformation."""
    from ..norms import NORMS

    write_csv(path, [{"norm": r["norm"], **{c: "yes" if is_invariant(r[t]) else "no" for c, t in zip(COLUMNS, TRANSFORMS)}}
                     for r in rows if r["norm"] in NORMS])


def is_invariant(change: float) -> bool:
    return change < TOLERANCE


def paper_check(rows: list[dict]) -> dict[str, list[str]]:
    """Per paper row: the transformations where the measurement disagrees with Ba et al. (empty: agrees)."""
    by_name = {r["norm"]: r for r in rows}
    return {paper: [t for t, expected in zip(TRANSFORMS, PAPER[paper])
                    if is_invariant(by_name[measured][t]) != expected]
            for paper, measured in PAPER_ROWS.items()}


def write_invariance(out: Path, rows: list[dict]) -> str:
    """``invariances.csv`` (the relative changes of every row), ``invariance.csv`` (yes/no, one row per registered
    norm), ``invariances.png``; returns the markdown summary."""
    write_csv(out / "invariances.csv", rows)
    write_yes_no(out / "invariance.csv", rows)
    _plot(out / "invariances.png", rows)
    short = ("W re-scale", "W re-center", "w_i re-scale", "data re-scale", "data re-center", "case re-scale")
    table = ["| norm | " + " | ".join(short) + " |", "|---|" + "---|" * len(short)]
    for r in rows:
        table.append(f"| {r['norm']} | " + " | ".join("**invariant**" if is_invariant(r[t]) else "no"
                                                      for t in TRANSFORMS) + " |")
    check = paper_check(rows)
    agreement = "; ".join(f"{paper} ({PAPER_ROWS[paper]}): " + ("all 6 entries agree" if not wrong else
                                                                 "disagrees on " + ", ".join(wrong))
                          for paper, wrong in check.items())
    return "\n".join([
        "Output change of each norm applied to the summed inputs a = x W^T of a linear layer (float64, batch of "
        "8 sequences x 16 positions, 48 inputs, 32 units, random gains and biases), under Ba et al.'s six "
        f"transformations; **invariant** = largest change below {TOLERANCE:g} of the output's scale (the "
        "measured changes are in `invariances.csv`: invariant entries sit near 1e-6, the eps terms; the others "
        "above 1e-2). Training mode unless the row says otherwise; a training case is one sequence.", "",
        *table, "",
        "**Paper** (Ba et al. 2016, Table 1): batch norm is invariant to weight matrix re-scaling, weight vector "
        "re-scaling, dataset re-scaling and re-centering; weight norm to weight matrix and weight vector "
        "re-scaling; layer norm to weight matrix re-scaling and re-centering, dataset re-scaling and single "
        "training case re-scaling.", "",
        f"**Measured**: {agreement}. Beyond the paper: RMSNorm and ScaleNorm lose layer norm's re-centering "
        "invariance (they do not subtract a mean) and keep the rest; LayerNorm-simple and AdaNorm keep all of "
        "layer norm's (AdaNorm's scaling is a function of the standardized input); DyT and no norm are invariant "
        "to nothing. PowerNorm without group scaling, in its warmup, divides each channel by the batch quadratic "
        "mean: batch norm's re-scaling invariances without its re-centering one (no mean is subtracted); after "
        "its warmup it divides by the fixed running statistic and, like BatchNorm in evaluation mode, is "
        "invariant to nothing. PowerNorm as tformer's blocks build it first divides each token by its RMS "
        "within each head-sized group (the authors' group scaling): that makes it invariant to every "
        "transformation that scales whole tokens (weight matrix, dataset, single case), in training and "
        "evaluation alike, and no longer to weight vector re-scaling.",
    ])


def _plot(path: Path, rows: list[dict]) -> None:
    from matplotlib.colors import ListedColormap

    from .plots import pyplot

    plt = pyplot()
    values = [[1.0 if is_invariant(r[t]) else 0.0 for t in TRANSFORMS] for r in rows]
    fig, ax = plt.subplots(figsize=(9.5, 0.42 * len(rows) + 1.8))
    ax.imshow(values, cmap=ListedColormap(["#f2b8b5", "#a8dba8"]), vmin=0, vmax=1, aspect="auto")
    for i, r in enumerate(rows):
        for j, t in enumerate(TRANSFORMS):
            ax.text(j, i, f"{'invariant' if is_invariant(r[t]) else 'no'}\n{r[t]:.0e}", ha="center", va="center",
                    fontsize=7)
    ax.set_xticks(range(len(TRANSFORMS)), [t.replace(" re-", "\nre-") for t in TRANSFORMS], fontsize=8)
    ax.set_yticks(range(len(rows)), [r["norm"] for r in rows], fontsize=8)
    ax.set_title(f"Invariances measured (Ba et al. 2016, Table 1, extended)\ninvariant = relative output change "
                 f"< {TOLERANCE:g} (the number: the measured change)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
