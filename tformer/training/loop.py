"""The training loop: ``train(config)`` runs a recipe from its first (or resumed) step to its last.

Setup builds the task and model, wraps the model in DistributedDataParallel or shards it with FSDP2
when several processes run, builds the optimizer, schedule and step engine (``engine.py``) and
resumes from the run directory when it can. Each step then computes the loss and gradients of batch
``step`` (micro-batched, in the run's precision), clips, stops with ``TrainingDiverged`` at a
non-finite loss or gradient (not at an fp16 step the gradient scaler skips), updates, and on its
cadence logs a metrics row, evaluates and checkpoints (rank 0 alone writes, but every rank writes
its shards of an FSDP checkpoint).

SIGINT (Ctrl-C) and SIGTERM do not kill a run mid-step: the step under way finishes (its metrics,
evaluation and scheduled checkpoint included), a checkpoint of that step is written (the full
training state, atomically, as a scheduled one: resuming is bitwise exact), and ``train`` raises
``TrainingInterrupted`` naming the step the same command resumes from. A further signal meanwhile is
reported and ignored, so it cannot tear the checkpoint. The handlers are installed for the steps only,
in the main thread only (elsewhere signals keep their handlers), and the previous ones are restored;
a signal the process ignores stays ignored. Several processes agree after every step (one MAX
all-reduce of the signal number, skipped in one process) and all stop after the same step.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import atomic_write
from ..recipe_config import dump_config
from .diagnosis import TrainingDiverged, divergence_message, scaler_stuck_message
from .distributed import Dist, barrier, process_group, resolve_device, wrap_model
from .engine import MAX_CONSECUTIVE_SKIPS, PRECISIONS, StepEngine, split_batch
from .optimization import build_optimizer, build_scheduler
from .schema import check_recipe
from .run_logs import MetricsLog, Throughput, measured_peak_flops, monitoring, progress_bar
from .tasks import TASKS
from .train_state import resume, save_training_state, start_over, writable_run_dir


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    evals: list[dict] = field(default_factory=list)
    diverged: str | None = None

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``train`` after step ``step``, whose checkpoint (``checkpoint``; None when
    ``log.checkpoint_every=0``) was written first. A ``KeyboardInterrupt``, as Ctrl-C always raised, so
    ``except Exception`` does not swallow it; ``exit_code`` is the shell's 128 + signal number (130 for
    SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: Path, checkpoint: Path | None, resumes: bool):
        self.signum, self.step, self.run_dir, self.checkpoint = signum, step, run_dir, checkpoint
        self.exit_code = 128 + signum
        if checkpoint is None:
            then = "checkpoints are off (log.checkpoint_every=0), so nothing was saved: the same command starts over"
        elif resumes:
            then = f"checkpoint written to {checkpoint}; run the same command to resume from step {step}"
        else:
            then = (f"checkpoint written to {checkpoint}; run the same command with resume=true to resume from "
                    f"step {step} (with resume=false it starts over)")
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} of {steps}; {then}")


def train(config: dict, *, progress: bool | None = None, stop_at: int | None = None) -> RunResult:
    """Run the recipe ``config`` (see ``tformer.training``). Raises ``TrainingDiverged`` on NaN/inf.

    ``stop_at`` ends the session after that step as an interruption would (no final checkpoint):
    for time-boxed sessions and for testing resumption. Under torchrun (or inside a process group
    the caller created) each process trains its slice of every batch; a group ``train`` had to
    create is destroyed on return, the caller's is left as it was. ``check_recipe`` (what ``tformer train
    --print-config`` runs too) first checks every key, the data and the model, so a bad config stops here.
    """
    world = Dist.current()
    check_recipe(config, world)
    device = resolve_device(config["device"], world)
    with process_group(world, device):
        return _run(config, world, device, config["log"]["progress"] if progress is None else progress, stop_at)


@dataclass
class _Run:
    """Everything a training session works on."""

    config: dict
    world: Dist
    task: object
    model: nn.Module
    trained: nn.Module  # the model (FSDP-sharded in place), or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    metrics: MetricsLog
    result: RunResult
    engine: StepEngine


def _run(config: dict, world: Dist, device: torch.device, show_progress: bool, stop_at: int | None) -> RunResult:
    task = TASKS[config["task"]](config, world, device)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    model = task.build_model().to(device)
    trained = wrap_model(model, world, device, config["train"])  # FSDP shards in place: before the optimizer
    optimizer = build_optimizer(model, config["train"])
    scheduler = build_scheduler(optimizer, config["train"])
    run_dir = Path(config["out_dir"]) / config["run"]
    engine = StepEngine(model, trained, optimizer, task, config["train"], device)
    start = resume(config, run_dir, model, optimizer, scheduler, engine)
    if world.is_main:
        writable_run_dir(run_dir)  # a directory that cannot be written stops the run now, not at its first save
        if not start:
            start_over(run_dir)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(dump_config(config)))
    metrics = MetricsLog(run_dir / "metrics.jsonl", world.is_main, start if start else None)
    run = _Run(config, world, task, model, trained, optimizer, scheduler, metrics, RunResult(run_dir, start), engine)
    log = config["log"]
    # sharded gradients are gathered for the monitor by every process (a collective); only rank 0 writes
    watchers = log["monitor"] and (world.is_main or engine.sharded)
    with monitoring(watchers, model, optimizer, log["monitor_every"], run_dir, start, write=world.is_main):
        _loop(run, start, show_progress, stop_at)
    return run.result


def _loop(run: _Run, start: int, show_progress: bool, stop_at: int | None) -> None:
    with _StopSignals(run.world.is_main, saves=run.config["log"]["checkpoint_every"] > 0) as signals:
        _steps(run, start, show_progress, stop_at, signals)


def _steps(run: _Run, start: int, show_progress: bool, stop_at: int | None, signals: _StopSignals) -> None:
    steps, log = run.config["train"]["steps"], run.config["log"]
    bar = progress_bar(steps, start, run.config["run"], show_progress and run.world.is_main)
    throughput = Throughput()
    compile_reported = False
    flops_per_token = run.task.flops_per_token(run.model)
    peak = _peak_flops(run) if flops_per_token else None
    step = start
    engine = run.engine
    while step < steps:
        batch = run.task.batch(step)
        loss, grad_norm = engine.gradients(batch)
        if not engine.skips(loss, grad_norm) and not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            _stop_diverged(run, step + 1, loss, batch, bar)
        engine.update()
        if engine.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            _stop(run, step + 1, scaler_stuck_message(step + 1, engine.consecutive_skips, engine.scaler.get_scale(),
                                                      run.model, run.result.run_dir), bar)
        run.scheduler.step()
        step += 1
        throughput.count(run.task.tokens(batch) * run.world.world_size)
        if _due(step, log["every"], steps):
            row = {"step": step, "loss": run.world.mean(loss).item(), "lr": run.scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm.item(), "tokens_per_s": throughput.rate()}
            if peak:
                row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * run.world.world_size)
            if engine.scaler is not None:
                row.update(loss_scale=engine.scaler.get_scale(), skipped_steps=engine.skipped_steps)
            if engine.compile_seconds is not None and not compile_reported:
                row["compile_s"] = engine.compile_seconds
                compile_reported = True
            run.metrics.write(row)
            postfix = dict(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if "mfu" in row:
                postfix["mfu"] = f"{row['mfu']:.1%}"
            if engine.compile_seconds:
                postfix["compile"] = f"{engine.compile_seconds:.1f}s"
            if engine.skipped_steps:
                postfix["skipped"] = str(engine.skipped_steps)
            bar.set_postfix(**postfix)
        if _due(step, log["eval_every"], steps):
            run.model.eval()
            evaluation = {"step": step, **run.task.evaluate(run.model)}
            run.result.evals.append(evaluation)
            run.metrics.write(evaluation)
        saved = log["checkpoint_every"] > 0 and _due(step, log["checkpoint_every"], steps)
        if saved:
            _save(run, step)
        bar.update(1)
        run.result.steps = step
        if stop_at is not None and step >= stop_at:
            break
        if step < steps:
            signum = run.world.largest(signals.signum, engine.device)  # all processes stop after the same step
            if signum:
                _stop_interrupted(run, step, signum, saved, bar)
    bar.close()


def _save(run: _Run, step: int) -> None:
    sharded = run.config["train"]["parallel"] == "fsdp"  # every process writes its shards
    if run.world.is_main or sharded:
        save_training_state(run.result.run_dir, step, run.model, run.optimizer, run.scheduler, run.config,
                            run.config["log"]["keep_checkpoints"], run.engine.state_dict(), run.world, sharded)


class _StopSignals:
    """While the steps run, SIGINT and SIGTERM ask for a stop after the current step instead of ending the
    process mid-step; later signals are reported and ignored until the stop's checkpoint is written.
    Installed in the main thread only, leaving an ignored signal ignored; the previous handlers come back
    on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool, saves: bool):
        self.signum, self.announce, self.saves, self.previous = 0, announce, saves, {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                handler = signal.getsignal(number)
                if handler is signal.SIG_IGN:
                    continue
                try:
                    signal.signal(number, self._handle)
                except ValueError:  # not the main interpreter
                    break
                self.previous[number] = handler
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if not self.signum:
            self.signum = number
            then = ("then saving a checkpoint and stopping (a SIGKILL now would lose the steps since the last "
                    "checkpoint)" if self.saves else "then stopping (checkpoints are off: nothing will be saved)")
            message = f"{name} received: finishing the current step, {then}"
        else:
            message = f"{name} received again: still finishing the step{' and its checkpoint' if self.saves else ''}; ignored"
        if self.announce:
            print(f"\ntformer train: {message}", file=sys.stderr, flush=True)


def _stop_interrupted(run: _Run, step: int, signum: int, saved: bool, bar) -> None:
    """Checkpoint ``step`` (unless its scheduled checkpoint was just written) and raise ``TrainingInterrupted``."""
    checkpoint = None
    if run.config["log"]["checkpoint_every"] > 0:
        if not saved:
            _save(run, step)
        if run.config["train"]["parallel"] != "fsdp":
            barrier(run.world)  # the other processes leave once rank 0 has written it (FSDP's save waits itself)
        checkpoint = run.result.run_dir / f"step_{step:07d}"
    bar.close()
    raise TrainingInterrupted(signum, step, run.config["train"]["steps"], run.result.run_dir, checkpoint,
                              run.config["resume"])


def _peak_flops(run: _Run) -> float:
    """Per-process peak FLOP/s for MFU: ``train.peak_tflops``, or a matmul measured now in the run's dtype."""
    given = run.config["train"]["peak_tflops"]
    if given:
        return float(given) * 1e12
    dtype = PRECISIONS[run.config["train"]["precision"]] or torch.float32
    device = next(run.model.parameters()).device
    return measured_peak_flops(device, dtype)


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _stop_diverged(run: _Run, step: int, loss: Tensor, batch, bar) -> None:
    def rerun():
        for micro in split_batch(batch, run.engine.accum):
            run.engine.loss(run.model, micro)

    _stop(run, step, divergence_message(step, loss, run.model, rerun, run.result.run_dir), bar)


def _stop(run: _Run, step: int, message: str, bar) -> None:
    run.metrics.write({"step": step, "diverged": message})
    bar.close()
    run.result.diverged = message
    raise TrainingDiverged(message)
