"""The placement study: which norm placement trains without learning-rate warmup, and which needs it.

Xiong et al. (2020, §3.2) found that Post-LN Transformers trained with Adam at lr 1e-3 fail
without warmup while Pre-LN ones train. ``run_study`` trains the same small byte-level language
model on the embedded corpus under each placement x norm, with and without warmup (everything
else equal: Adam(0.9, 0.98), lr 1e-3, cosine decay to 10%), and reports per run the final
validation loss, whether it diverged (non-finite loss) or stayed stuck near the unigram entropy
(the loss of predicting byte frequencies alone), and the steps it took to reach a target loss.
Outputs: ``results.csv``, ``results.md`` (table and verdict) and ``loss_curves.png``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .analysis.plots import pyplot
from .atlas import STUCK_MARGIN
from .checkpoint import write_csv
from .config import BlockConfig
from .data import corpus_splits
from .data import unigram_entropy as token_entropy
from .errors import ConfigError
from .recipe_config import load_config
from .training.diagnosis import TrainingDiverged
from .training.loop import train
from .training.schema import check_recipe, recipe_defaults

#: The study's model and optimizer: 6 layers (Xiong's depth), small enough for CPU.
STUDY_OVERRIDES = [
    "model.n_layers=6", "model.max_seq_len=64", "model.block.d_model=128", "model.block.n_heads=4",
    "model.block.d_ff=512", "model.block.activation=relu", "data.seq_len=64", "data.eval_windows=32",
    "train.batch_size=16", "train.lr=1e-3", "train.betas=[0.9, 0.98]", "train.schedule=cosine",
    "train.min_lr_ratio=0.1", "train.grad_clip=0", "log.every=5", "log.eval_every=25",
    "log.checkpoint_every=0", "log.progress=false", "resume=false",
]


@dataclass
class StudyRow:
    placement: str
    norm: str
    warmup_steps: int
    final_val_loss: float
    best_val_loss: float
    status: str  # "trained", "stuck (near unigram entropy)", or "diverged at step N"
    steps_to_target: int | None
    seconds: float
    final_bits_per_byte: float = math.nan  # comparable across tokenizers (data.tokenizer=bpe overrides)


def unigram_entropy(path: str = "python_docs", val_fraction: float = 0.1) -> float:
    """Entropy (nats/byte) of the training split's byte frequencies: the loss of a model without context."""
    return token_entropy(corpus_splits(path, val_fraction)[0])


#: the recipe keys ``run_study``'s arguments set, and the ``tformer study`` flag / argument that sets each
STUDY_KNOBS = {"train.steps": "--steps (steps=)", "train.warmup_steps": "--warmup (warmup_steps=)"}


def run_study(
    out_dir: str | Path = "runs/study",
    *,
    placements=("pre", "post", "sandwich", "deepnorm"),
    norms=("layernorm", "rmsnorm"),
    warmup_steps: int = 100,
    steps: int = 300,
    target_loss: float = 2.6,
    overrides: list[str] = (),
    progress: bool = True,
) -> tuple[list[StudyRow], dict]:
    """Train every placement x norm x {no warmup, ``warmup_steps``}; write and return the results."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for placement, norm, warmup in ((p, n, w) for p in placements for n in norms for w in (0, warmup_steps)):
        name = f"{placement}-{norm}-warmup{warmup}"
        runs[name] = (placement, norm, warmup, load_config(recipe_defaults("lm"), None, [
            *STUDY_OVERRIDES, f"train.steps={steps}", f"out_dir={out_dir / 'runs'}", f"run={name}",
            f"model.block.placement={placement}", f"model.block.norm={norm}", f"train.warmup_steps={warmup}",
            *overrides,
        ]))
        BlockConfig(**runs[name][3]["model"]["block"])  # a bad --placements/--norms name fails first, as itself
    for *_, config in runs.values():
        try:
            check_recipe(config)  # then any bad value: now, not after an hour of runs
        except ConfigError as error:  # name the study's own knobs where they set the keys the message names
            knobs = [f"{knob} sets {key}" for key, knob in STUDY_KNOBS.items() if key in str(error)]
            if knobs:
                raise ConfigError(f"{error} (tformer study: {'; '.join(knobs)})") from None
            raise
    entropy = unigram_entropy()
    rows, curves = [], {}
    bar = tqdm(runs.items(), desc="placement study", unit="run", disable=not progress, dynamic_ncols=True)
    for name, (placement, norm, warmup, config) in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            evals = train(config, progress=False).evals
            status = None
        except TrainingDiverged as error:
            evals, status = [], str(error).split(":")[0].replace("training diverged", "diverged")
        seconds = time.perf_counter() - start
        losses = [e["val_loss"] for e in evals]
        final = losses[-1] if losses else math.nan
        if status is None:
            status = arm_status(final, entropy)
        reached = next((e["step"] for e in evals if e["val_loss"] <= target_loss), None)
        bits = evals[-1].get("bits_per_byte", math.nan) if evals else math.nan
        rows.append(StudyRow(placement, norm, warmup, final, min(losses, default=math.nan), status, reached, seconds,
                             bits))
        curves[name] = ([e["step"] for e in evals], losses)
    summary = {"unigram_entropy": entropy, "target_loss": target_loss, "steps": steps, "warmup_steps": warmup_steps}
    write_results(out_dir, rows, curves, summary)
    return rows, summary


TRAINED = "trained"


def arm_status(final_val_loss: float, entropy: float) -> str:
    """A finished run's status: ``"trained"`` when its final validation loss is finite and at least
    ``STUCK_MARGIN`` nats below the unigram entropy ``entropy`` (a model that learned only the byte frequencies
    sits at the entropy, an untrained one above it, at ln 256 = 5.55 for bytes), else stuck (or, for a
    non-finite validation loss, diverged)."""
    if not math.isfinite(final_val_loss):
        return "diverged (non-finite validation loss)"
    return "stuck (near unigram entropy)" if final_val_loss > entropy - STUCK_MARGIN else TRAINED


def _arm(rows: list[StudyRow], placement: str, norm: str, warmup: bool) -> StudyRow | None:
    return next((r for r in rows if (r.placement, r.norm, r.warmup_steps > 0) == (placement, norm, warmup)), None)


def verdict(rows: list[StudyRow], margin: float = 0.1) -> list[str]:
    """One line per placement, from each norm's two arms (no warmup, warmup), whose ``status`` says whether
    they trained (``arm_status``):

    * neither arm trained: **neither trains at this budget** (the study cannot tell whether warmup is needed);
    * the no-warmup arm trained and ended within ``margin`` of the warmup arm, or the warmup arm did not
      train: **trains without warmup**;
    * the warmup arm trained and the no-warmup arm did not (stuck, diverged) or ended worse by more than
      ``margin``: **needs warmup**.

    A placement needs warmup when one of its norms does; the others' findings follow on the same line.
    """
    lines = []
    for placement in dict.fromkeys(r.placement for r in rows):
        needs, neither, fine, warm_failed = [], [], [], []
        for norm in dict.fromkeys(r.norm for r in rows if r.placement == placement):
            cold, warm = _arm(rows, placement, norm, False), _arm(rows, placement, norm, True)
            if cold is None or warm is None:  # a study without one of the arms (--warmup 0) compares nothing
                continue
            cold_ok, warm_ok = cold.status == TRAINED, warm.status == TRAINED
            if not cold_ok and not warm_ok:
                neither.append(f"{norm}: {cold.final_val_loss:.3f} without warmup ({cold.status}), "
                               f"{warm.final_val_loss:.3f} with ({warm.status})")
            elif cold_ok and (not warm_ok or cold.final_val_loss <= warm.final_val_loss + margin):
                fine.append(norm)
                if not warm_ok:
                    warm_failed.append(f"{norm}: {warm.final_val_loss:.3f}, {warm.status}")
            else:
                needs.append(f"{norm}: {cold.final_val_loss:.3f} without warmup ({cold.status}) vs "
                             f"{warm.final_val_loss:.3f} with")
        untold = f"neither trains at this budget with {'; '.join(neither)}" if neither else ""
        if needs:
            lines.append(f"- **{placement} needs warmup**: " + "; ".join(needs) + (f"; {untold}" if untold else "")
                         + ".")
        elif neither and not fine:
            lines.append(f"- **{placement}: neither trains at this budget** ({'; '.join(neither)}): no run ended "
                         f"{STUCK_MARGIN} below the unigram entropy, so this budget cannot tell whether {placement} "
                         f"needs warmup; train longer (more steps).")
        elif fine:
            compared = [norm for norm in fine if not any(w.startswith(f"{norm}:") for w in warm_failed)]
            notes = [f"final loss within {margin} of the warmup run"
                     + (f" with {', '.join(compared)}" if warm_failed else "")] if compared else []
            if warm_failed:
                notes.append(f"the warmup run did not train at this budget: {'; '.join(warm_failed)}")
            lines.append(f"- **{placement} trains without warmup**" + (f" with {', '.join(fine)}" if untold else "")
                         + f" ({'; '.join(notes)})" + (f"; {untold}" if untold else "") + ".")
    return lines


def write_results(out_dir: Path, rows: list[StudyRow], curves: dict, summary: dict) -> None:
    write_csv(out_dir / "results.csv", [asdict(r) for r in rows])
    header = ("| placement | norm | warmup steps | final val loss | final bits/byte | best val loss | status | "
              "steps to target | seconds |")
    lines = [
        "# Placement study: which placement trains without warmup?", "",
        f"{summary['steps']} steps of a 6-layer byte-level LM (d_model 128) on the embedded corpus, Adam "
        f"(0.9, 0.98), lr 1e-3 with cosine decay to 10%, with no warmup or {summary['warmup_steps']} warmup steps "
        f"(Xiong et al. 2020, §3.2). Loss in nats/byte; unigram entropy {summary['unigram_entropy']:.3f}; "
        f"target {summary['target_loss']}. A run *trained* when its final validation loss is at least "
        f"{STUCK_MARGIN} below the unigram entropy (<= {summary['unigram_entropy'] - STUCK_MARGIN:.3f}), else it "
        f"is stuck (or diverged); warmup is judged needed only where the warmup run trained.", "",
        header, "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r.steps_to_target is None else str(r.steps_to_target)
        lines.append(f"| {r.placement} | {r.norm} | {r.warmup_steps} | {r.final_val_loss:.3f} | "
                     f"{r.final_bits_per_byte:.3f} | {r.best_val_loss:.3f} | {r.status} | {target} | {r.seconds:.0f} |")
    lines += ["", "## Verdict", "", *verdict(rows), "", "![validation loss curves](loss_curves.png)", ""]
    (out_dir / "results.md").write_text("\n".join(lines))
    plot_curves(out_dir / "loss_curves.png", rows, curves, summary)


def plot_curves(path: Path, rows: list[StudyRow], curves: dict, summary: dict) -> None:
    plt = pyplot()
    norms = list(dict.fromkeys(r.norm for r in rows))
    placements = list(dict.fromkeys(r.placement for r in rows))
    colors = dict(zip(placements, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4.5), sharey=True, squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for r in rows:
            if r.norm != norm:
                continue
            steps, losses = curves[f"{r.placement}-{r.norm}-warmup{r.warmup_steps}"]
            style = "-" if r.warmup_steps else "--"
            label = f"{r.placement}, {'warmup ' + str(r.warmup_steps) if r.warmup_steps else 'no warmup'}"
            ax.plot(steps, losses, style, color=colors[r.placement], label=label)
        ax.axhline(summary["unigram_entropy"], color="grey", lw=0.8, ls=":", label="unigram entropy")
        ax.set_title(norm)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("Placement study: solid = with warmup, dashed = without")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
