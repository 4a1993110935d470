"""The training loop behind the recipes: LM and seq2seq, resumable, watchful, distributed-ready.

``train(config)`` takes a validated recipe config (``recipe_defaults`` + ``load_config``) and:

* builds the model, an AdamW optimizer (no weight decay on norms, biases and scalars) and a
  warmup schedule;
* resumes from ``<out_dir>/<run>/latest.json`` when it exists (``resume: true``), restoring
  weights, optimizer, scheduler, step and RNG states, so a stopped run ends bitwise where an
  uninterrupted one would (batches are a function of ``(seed, step)``);
* shows a progress bar (loss, lr, tokens/s, ETA), writes ``metrics.jsonl``, evaluates on
  validation data (loss and perplexity; exact-match accuracy for seq2seq), checkpoints every
  ``log.checkpoint_every`` steps and at the end (0: never);
* stops at the first non-finite loss or gradient with a message naming the step, the first
  layer whose output went non-finite and the first layer whose gradients did, keeping the last
  good checkpoint;
* under ``torchrun`` wraps the model in DistributedDataParallel (gloo on CPU, nccl on CUDA); each
  process takes its slice of the same global batch and only rank 0 writes.

Checkpoints are safetensors (model, optimizer tensors, RNG states) plus JSON (step, scheduler,
optimizer settings, config): nothing is unpickled on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import checkpoint
from .config import BlockConfig
from .data import ByteTokenizer, LMBatches, Seq2SeqTask, corpus_splits, eval_windows
from .errors import CheckpointError, ConfigError
from .models import EncoderDecoder, LanguageModel
from .recipe_config import dump_config
from .schedulers import make_scheduler

_BLOCK_DEFAULTS = {**dataclasses.asdict(BlockConfig(d_model=128, n_heads=4, d_ff=512)), "attention": "auto"}

_COMMON = {
    "run": "run",
    "out_dir": "checkpoints",
    "seed": 0,
    "device": "auto",
    "resume": True,
    "train": {
        "steps": 1000,
        "batch_size": 16,
        "lr": 1e-3,
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "schedule": "inverse_sqrt",
        "warmup_steps": 100,
        "min_lr_ratio": 0.0,
    },
    "log": {"every": 10, "eval_every": 100, "checkpoint_every": 500, "keep_checkpoints": 2, "progress": True,
            "monitor": False, "monitor_every": 10},
}

LM_DEFAULTS = {
    "task": "lm",
    **_COMMON,
    "model": {"n_layers": 4, "max_seq_len": 256, "positions": "learned", "tie_embeddings": True,
              "block": dict(_BLOCK_DEFAULTS)},
    "data": {"path": "python_docs", "seq_len": 128, "val_fraction": 0.1, "eval_windows": 64},
}

SEQ2SEQ_DEFAULTS = {
    "task": "seq2seq",
    **_COMMON,
    "model": {"n_encoder_layers": 2, "n_decoder_layers": 2, "positions": "learned", "tie_embeddings": True,
              "block": dict(_BLOCK_DEFAULTS)},
    "data": {"task": "copy", "vocab_size": 16, "min_len": 4, "max_len": 12, "eval_examples": 256},
}

RECIPE_DEFAULTS = {"lm": LM_DEFAULTS, "seq2seq": SEQ2SEQ_DEFAULTS}


def recipe_defaults(task: str) -> dict:
    if task not in RECIPE_DEFAULTS:
        raise ConfigError(f"task={task!r}; valid choices: {', '.join(map(repr, RECIPE_DEFAULTS))}")
    return RECIPE_DEFAULTS[task]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message says where."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    evals: list[dict] = field(default_factory=list)
    diverged: str | None = None

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}


# ----------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def mean(self, value: Tensor) -> Tensor:
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


def _device(config: dict, world: Dist) -> torch.device:
    name = config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.world_size > 1:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


# ----------------------------------------------------------------------------------------- tasks


class LanguageModelTask:
    """Byte-level language modelling on the embedded corpus or a user's text file."""

    def __init__(self, config: dict, world: Dist, device: torch.device):
        data = config["data"]
        self.tokenizer = ByteTokenizer()
        train_tokens, val_tokens = corpus_splits(data["path"], data["val_fraction"])
        self.seq_len = data["seq_len"]
        if self.seq_len > config["model"]["max_seq_len"]:
            raise ConfigError(f"data.seq_len={self.seq_len} exceeds model.max_seq_len={config['model']['max_seq_len']}")
        self.batches = LMBatches(train_tokens, config["train"]["batch_size"], self.seq_len, config["seed"],
                                 world.rank, world.world_size)
        self.val = eval_windows(val_tokens, self.seq_len, data["eval_windows"])
        self.config, self.device = config, device

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return LanguageModel(BlockConfig(**m["block"]), m["n_layers"], self.tokenizer.vocab_size, m["max_seq_len"],
                             positions=m["positions"], tie_embeddings=m["tie_embeddings"])

    def batch(self, step: int) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device) for t in self.batches.batch(step))

    def loss(self, model: nn.Module, batch) -> Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def tokens(self, batch) -> int:
        return batch[0].numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        inputs, targets = (t.to(self.device) for t in self.val)
        total = 0.0
        for i in range(0, len(inputs), 16):
            total += self.loss(model, (inputs[i : i + 16], targets[i : i + 16])).item() * len(inputs[i : i + 16])
        loss = total / len(inputs)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class SequenceToSequenceTask:
    """Copy / reverse / sort with an encoder-decoder; exact match by greedy decoding."""

    def __init__(self, config: dict, world: Dist, device: torch.device):
        data = config["data"]
        self.data = Seq2SeqTask(data["task"], data["vocab_size"], data["min_len"], data["max_len"],
                                config["train"]["batch_size"], config["seed"], world.rank, world.world_size)
        self.val = self.data.validation(data["eval_examples"])
        self.config, self.device = config, device

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return EncoderDecoder(BlockConfig(**m["block"]), m["n_encoder_layers"], m["n_decoder_layers"],
                              self.data.vocab_size, max_seq_len=self.data.max_seq_len, positions=m["positions"],
                              tie_embeddings=m["tie_embeddings"])

    def batch(self, step: int) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device) for t in self.data.batch(step))

    def loss(self, model: nn.Module, batch) -> Tensor:
        src, tgt_in, tgt_out, src_pad, tgt_pad = batch
        logits = model(src, tgt_in, src_padding_mask=src_pad, tgt_padding_mask=tgt_pad)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                               ignore_index=self.data.PAD)

    def tokens(self, batch) -> int:
        return int((~batch[4]).sum()) + int((~batch[3]).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model = getattr(model, "module", model)
        src, tgt_in, tgt_out, src_pad, tgt_pad = (t.to(self.device) for t in self.val)
        loss = self.loss(model, (src, tgt_in, tgt_out, src_pad, tgt_pad)).item()
        memory = model.encode(src, src_padding_mask=src_pad)
        decoded = torch.full_like(tgt_in[:, :1], self.data.BOS)
        for _ in range(tgt_out.shape[1]):
            logits = model.decode(decoded, memory, src_padding_mask=src_pad)
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
        predicted = decoded[:, 1:].masked_fill(tgt_pad, self.data.PAD)
        exact = (predicted == tgt_out).all(1).float().mean().item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "exact_match": exact}


TASKS = {"lm": LanguageModelTask, "seq2seq": SequenceToSequenceTask}


# ----------------------------------------------------------------------------------------- optimizer


def build_optimizer(model: nn.Module, train: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on norms, biases, scalars)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"])


# ----------------------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Tensor], plain: dict) -> dict:
    state = {int(i): dict(entries) for i, entries in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_training_state(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, config: dict,
                        keep: int) -> Path:
    """Write ``step_NNNNNNN/`` (model, optimizer, RNG, JSON state) atomically, then point ``latest.json`` at it."""
    name = f"step_{step:07d}"
    final, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpoint.save(model, tmp / "model.safetensors")
    tensors, plain_optimizer = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    checkpoint.atomic_write(tmp / "train_state.safetensors", lambda p: save_file(tensors, p))
    state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": plain_optimizer,
             "python_random": _jsonable(random.getstate()), "config": config}
    checkpoint.atomic_write(tmp / "train_state.json", lambda p: Path(p).write_text(json.dumps(state)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpoint.atomic_write(run_dir / "latest.json", lambda p: Path(p).write_text(json.dumps({"step": step, "dir": name})))
    shutil.copyfile(final / "model.safetensors", run_dir / ".model.safetensors.tmp")
    os.replace(run_dir / ".model.safetensors.tmp", run_dir / "model.safetensors")
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def load_training_state(run_dir: Path, model: nn.Module, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the checkpoint ``latest.json`` points at; returns ``(step, saved config)``."""
    try:
        latest = json.loads((run_dir / "latest.json").read_text())
        directory = run_dir / latest["dir"]
        state = json.loads((directory / "train_state.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{run_dir}: cannot resume, the training state is unreadable ({error})") from None
    saved = checkpoint.load(directory / "model.safetensors")
    model.load_state_dict(saved.state_dict())
    try:
        tensors = load_file(directory / "train_state.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{directory}: cannot resume, the optimizer/RNG state is damaged ({type(error).__name__}: {error}); "
            f"remove {run_dir / 'latest.json'} to start over, or pass resume=false"
        ) from None
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(state["python_random"]))
    return state["step"], state["config"]


# ----------------------------------------------------------------------------------------- diagnosis


def _block_name(param_name: str) -> str:
    parts = param_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) or parts[0]


def nonfinite_gradient_blocks(model: nn.Module) -> list[str]:
    """Blocks (and embedding, head, final norm) holding inf/NaN gradients, in backward order from the loss.

    The first entry is where back-propagation first produced a non-finite gradient.
    """
    names = [_block_name(n) for n, p in reversed(list(model.named_parameters()))
             if p.grad is not None and not torch.isfinite(p.grad).all()]
    return list(dict.fromkeys(names))


@torch.no_grad()
def first_nonfinite_output(model: nn.Module, run) -> str | None:
    """Rerun ``run()`` with hooks; the first module (embedding, block, head) whose output is non-finite."""
    found: list[str] = []
    watched = [(n, m) for n, m in model.named_modules()
               if n.endswith(("embedding", "head", "final_norm")) or (n.split(".")[-2:-1] == ["layers"])]

    def hook(name):
        def check(module, inputs, output):
            if not found and isinstance(output, Tensor) and not torch.isfinite(output).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in watched]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


# ----------------------------------------------------------------------------------------- loop


class MetricsLog:
    """Append-only JSONL of metric rows; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in rows))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def train(config: dict, *, progress: bool | None = None, stop_at: int | None = None) -> RunResult:
    """Run the recipe ``config`` (see the module docstring). Raises ``TrainingDiverged`` on NaN/inf.

    ``stop_at`` ends the session after that step as an interruption would (no final checkpoint):
    for time-boxed sessions and for testing resumption.
    """
    world = Dist.from_env()
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and config["device"] != "cpu" else "gloo")
    try:
        return _train(config, world, config["log"]["progress"] if progress is None else progress, stop_at)
    finally:
        if world.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: dict, world: Dist, show_progress: bool, stop_at: int | None) -> RunResult:
    device = _device(config, world)
    task = TASKS[config["task"]](config, world, device)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    model = task.build_model().to(device)
    train_cfg, log_cfg = config["train"], config["log"]
    optimizer = build_optimizer(model, train_cfg)
    total = train_cfg["steps"] if train_cfg["steps"] > train_cfg["warmup_steps"] else None
    scheduler = make_scheduler(optimizer, train_cfg["schedule"], train_cfg["warmup_steps"], total,
                               min_lr_ratio=train_cfg["min_lr_ratio"])
    run_dir = Path(config["out_dir"]) / config["run"]
    start = 0
    if config["resume"] and (run_dir / "latest.json").exists():
        start, saved_config = load_training_state(run_dir, model, optimizer, scheduler)
        if saved_config["model"] != config["model"] or saved_config["task"] != config["task"]:
            raise ConfigError(f"{run_dir} holds a run with a different model; pick another run name or resume=false")
        _apply_schedule_config(scheduler, optimizer, train_cfg, total)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    metrics = MetricsLog(run_dir / "metrics.jsonl", world.is_main, start if start else None)
    trained = model if world.world_size == 1 else nn.parallel.DistributedDataParallel(model)
    result = RunResult(run_dir, start)
    monitor = None
    if log_cfg["monitor"] and world.is_main:
        from .analysis import TrainingMonitor

        monitor_log = MetricsLog(run_dir / "monitor.jsonl", True, start if start else None)
        monitor = TrainingMonitor(model, optimizer, every=log_cfg["monitor_every"], sink=monitor_log.write,
                                  start_step=start).attach()
    try:
        _loop(config, task, model, trained, optimizer, scheduler, world, metrics, result, start, show_progress, stop_at)
    finally:
        if monitor is not None:
            monitor.detach()
    if monitor is not None:
        from .analysis.plots import plot_monitor

        plot_monitor(run_dir / "monitor.jsonl", run_dir)
    return result


def _loop(config, task, model, trained, optimizer, scheduler, world, metrics, result, start, show_progress, stop_at):
    from tqdm.auto import tqdm

    train_cfg, log_cfg, run_dir = config["train"], config["log"], result.run_dir

    bar = tqdm(total=train_cfg["steps"], initial=start, desc=config["run"], unit="step", dynamic_ncols=True,
               disable=not (show_progress and world.is_main), mininterval=0.1 if sys.stderr.isatty() else 5.0)
    tokens_seen, clock = 0, time.perf_counter()
    step = start
    while step < train_cfg["steps"]:
        batch = task.batch(step)
        model.train()
        loss = task.loss(trained, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = train_cfg["grad_clip"] if train_cfg["grad_clip"] > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            message = _divergence_message(step + 1, loss, model, lambda: task.loss(model, batch), run_dir)
            metrics.write({"step": step + 1, "diverged": message})
            bar.close()
            result.diverged = message
            raise TrainingDiverged(message)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_seen += task.tokens(batch) * world.world_size
        if step % log_cfg["every"] == 0 or step == train_cfg["steps"]:
            elapsed = time.perf_counter() - clock
            row = {"step": step, "loss": world.mean(loss).item(), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm.item(), "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            tokens_seen, clock = 0, time.perf_counter()
        if step % log_cfg["eval_every"] == 0 or step == train_cfg["steps"]:
            model.eval()
            evaluation = {"step": step, **task.evaluate(model)}
            result.evals.append(evaluation)
            metrics.write(evaluation)
        every = log_cfg["checkpoint_every"]
        if world.is_main and every > 0 and (step % every == 0 or step == train_cfg["steps"]):
            save_training_state(run_dir, step, model, optimizer, scheduler, config, log_cfg["keep_checkpoints"])
        bar.update(1)
        result.steps = step
        if stop_at is not None and step >= stop_at:
            break
    bar.close()


def _apply_schedule_config(scheduler, optimizer, train_cfg: dict, total: int | None) -> None:
    """After a resume, the current config's schedule wins (e.g. a longer ``train.steps`` re-plans the decay)."""
    wanted = {"warmup_steps": train_cfg["warmup_steps"], "total_steps": total, "min_lr_ratio": train_cfg["min_lr_ratio"],
              "base_lrs": [train_cfg["lr"]] * len(optimizer.param_groups)}
    if all(getattr(scheduler, k) == v for k, v in wanted.items()):
        return
    for key, value in wanted.items():
        setattr(scheduler, key, value)
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _divergence_message(step: int, loss: Tensor, model: nn.Module, rerun, run_dir: Path) -> str:
    bad_output = first_nonfinite_output(model, rerun)
    bad_grads = nonfinite_gradient_blocks(model)
    what = f"loss is {loss.item()}" if not torch.isfinite(loss) else "the gradient norm is not finite"
    parts = [f"training diverged at step {step}: {what}"]
    if bad_output:
        parts.append(f"the first non-finite output comes from {bad_output}")
    if bad_grads:
        shown = ", ".join(bad_grads[:6]) + (f" and {len(bad_grads) - 6} more" if len(bad_grads) > 6 else "")
        parts.append(f"gradients first go non-finite at {bad_grads[0]} (back-propagating from the loss: {shown})")
    latest = run_dir / "latest.json"
    kept = f"the last good checkpoint is kept in {run_dir}" if latest.exists() else "no checkpoint had been written yet"
    return "; ".join(parts) + f"; {kept}"
