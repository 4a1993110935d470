"""Saving and restoring everything a run needs to resume bitwise where it stopped.

A checkpoint is a directory ``<run>/step_NNNNNNN/`` holding ``model.safetensors`` (the model, as
``tformer.save`` writes it), ``train_state.safetensors`` (optimizer tensors and RNG states) and
``train_state.json`` (step, scheduler, the optimizer's plain values, Python's RNG state, the
config). ``<run>/latest.json`` names the newest one and ``<run>/model.safetensors`` is a copy of
its model. Every file is written atomically and nothing is unpickled on resume.

Runs with ``train.parallel=fsdp`` write the model and optimizer through ``torch.distributed.checkpoint``
instead (``step_NNNNNNN/dcp/``: every rank writes its own shards, and any number of processes reads
them back, resharding), plus the same consolidated ``model.safetensors`` (gathered to rank 0) that
``tformer.load`` reads in one process. DCP writes its metadata file with ``pickle`` and its reader
would unpickle it as it is; tformer reads it with an unpickler that admits only the metadata classes
DCP itself writes (``SafeReader``), so a crafted ``.metadata`` raises ``CheckpointError`` instead of
running anything. The shard files' tensors are read as raw bytes (other bytes with ``weights_only``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import checkpoint
from ..errors import CheckpointError, ConfigError
from ..recipe_config import merge
from .distributed import Dist, barrier, is_sharded
from .optimization import replan_schedule
from .schema import recipe_defaults


def flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer ``state_dict`` as (tensors named ``optimizer.<param>.<key>``, JSON-able rest)."""
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, Tensor], plain: dict) -> dict:
    """The inverse of ``flatten_optimizer``."""
    state = {int(i): dict(entries) for i, entries in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def writable_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and a file in it, or raise ``CheckpointError`` naming it and the OS error: a run
    whose directory cannot be written stops before its first step, not at its first checkpoint."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write_probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"cannot write to the run directory {run_dir}: {_reason(error)}; make it writable "
                              f"or pick another out_dir") from None


def _reason(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _newest_checkpoint(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_training_state(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, config: dict,
                        keep: int, engine_state: dict | None = None, world: Dist | None = None,
                        sharded: bool = False) -> Path | None:
    """Write ``step_NNNNNNN/`` (model, optimizer, RNG, JSON state) atomically, then point ``latest.json`` at it.

    ``sharded`` (``train.parallel=fsdp``): every process of ``world`` must call it; the model and optimizer
    go through ``torch.distributed.checkpoint``. Otherwise only the main process calls it.

    The checkpoint is written under a temporary name and renamed, then ``model.safetensors`` and last
    ``latest.json`` are replaced atomically, so a process killed at any point leaves the newest complete
    checkpoint in place and readable (and the temporaries it left are removed by the next save). A
    failure to write (disk full, read-only directory) raises ``CheckpointError`` naming the directory,
    the OS error and the newest complete checkpoint, which stays whole."""
    world = world or Dist()
    try:
        return _save_training_state(run_dir, step, model, optimizer, scheduler, config, keep, engine_state, world,
                                    sharded)
    except OSError as error:
        if world.is_main:  # give the space back
            shutil.rmtree(run_dir / f".step_{step:07d}.tmp", ignore_errors=True)
            with contextlib.suppress(OSError):
                (run_dir / ".model.safetensors.tmp").unlink(missing_ok=True)
        newest = _newest_checkpoint(run_dir)
        kept = (f"the newest complete checkpoint (step {newest}) is whole: make room (or make the directory "
                f"writable) and run the same command to resume from it" if newest is not None
                else "there is no earlier checkpoint")
        raise CheckpointError(f"cannot write checkpoint step {step} to {run_dir}: {_reason(error)}; {kept}") from None


def _save_training_state(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, config: dict, keep: int,
                         engine_state: dict | None, world: Dist, sharded: bool) -> Path | None:
    name = f"step_{step:07d}"
    final, tmp = run_dir / name, run_dir / f".{name}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        barrier(world)
        _save_sharded(tmp, model, optimizer, world)
        if not world.is_main:
            barrier(world)  # until rank 0 has published the checkpoint
            return None
        tensors, plain_optimizer = {}, None
    else:
        checkpoint.save(model, tmp / "model.safetensors")
        tensors, plain_optimizer = flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    checkpoint.atomic_write(tmp / "train_state.safetensors", lambda p: save_file(tensors, p))
    state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": plain_optimizer,
             "python_random": _jsonable(random.getstate()), "config": config, "engine": engine_state or {}}
    checkpoint.atomic_write(tmp / "train_state.json", lambda p: Path(p).write_text(json.dumps(state)))
    if final.exists():  # the same step saved before (a session killed before it moved latest.json on)
        _discard(final, run_dir)
    os.replace(tmp, final)
    # the model copy before latest.json: a kill in between leaves latest.json one checkpoint behind (that
    # step is trained again and saved again), never pointing at a step whose model.safetensors is missing
    shutil.copyfile(final / "model.safetensors", run_dir / ".model.safetensors.tmp")
    os.replace(run_dir / ".model.safetensors.tmp", run_dir / "model.safetensors")
    checkpoint.atomic_write(run_dir / "latest.json", lambda p: Path(p).write_text(json.dumps({"step": step, "dir": name})))
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        _discard(stale, run_dir)
    for leftover in run_dir.glob(".*.tmp"):  # what killed sessions left half-written (never read)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    if sharded:
        barrier(world)
    return final


def _discard(directory: Path, run_dir: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ``step_*`` names first, so a kill during the removal
    leaves no half-deleted checkpoint behind, only a temporary the next save removes."""
    trash = run_dir / f".{directory.name}.discarded.tmp"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def start_over(run_dir: Path) -> None:
    """Before the first step of a run that starts at step 0: remove what a previous run left in ``run_dir``
    (``latest.json`` first, then ``model.safetensors`` and its ``step_*`` checkpoints), so a later resume cannot
    pick up the old run's state and checkpoint rotation does not keep the old run's higher steps. Says so on
    stderr when there was a previous run (``resume=false`` in a run directory that has a checkpoint)."""
    newest = _newest_checkpoint(run_dir)
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    if newest is None and not old:
        return
    if newest is not None:
        print(f"starting over in {run_dir} (resume=false): the previous run's checkpoints (the newest at step "
              f"{newest}) are removed", file=sys.stderr, flush=True)
    (run_dir / "latest.json").unlink(missing_ok=True)  # first: no pointer to a checkpoint being removed
    (run_dir / "model.safetensors").unlink(missing_ok=True)
    for directory in old:
        _discard(directory, run_dir)


def _save_sharded(directory: Path, model: nn.Module, optimizer, world: Dist) -> None:
    """Every rank writes its shards to ``directory/dcp``; rank 0 also writes the gathered ``model.safetensors``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / "dcp"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        checkpoint.save(consolidated(model, full), directory / "model.safetensors")


#: What DCP's metadata pickle may name: (module, name) pairs, or (module, None) for any class of the module.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", None), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections",
                                                                         "builtins")) else None
        allowed = ((module, name) in _METADATA_GLOBALS
                   or ((module, None) in _METADATA_GLOBALS and isinstance(found, type))
                   or (module == "torch" and isinstance(found, torch.dtype)))
        if not allowed:
            raise CheckpointError(f"the sharded checkpoint's metadata names {module}.{name}, which is not part of "
                                  f"torch.distributed.checkpoint's metadata; refusing to unpickle it (nothing from "
                                  f"a checkpoint is executed)")
        return found


def safe_reader(path: Path):
    """A ``torch.distributed.checkpoint`` ``FileSystemReader`` whose metadata is unpickled with an allowlist."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
                try:
                    metadata = _MetadataUnpickler(stream).load()
                except CheckpointError:
                    raise
                except Exception as error:  # truncated or otherwise damaged pickle
                    raise CheckpointError(f"{path}: the sharded checkpoint's metadata is unreadable "
                                          f"({type(error).__name__}: {error})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def consolidated(model: nn.Module, state: dict) -> nn.Module:
    """A plain (unsharded) tformer model with ``model``'s spec holding the full ``state``."""
    from ..spec import BuiltFromSpec

    cls = next(c for c in type(model).__mro__ if issubclass(c, BuiltFromSpec) and not c.__name__.startswith("FSDP"))
    with torch.random.fork_rng(devices=[]):  # its random init must not move this rank's RNG (dropout masks)
        plain = cls.from_spec(model.spec)  # built normally, so tied weights stay tied; then overwritten
    plain.load_state_dict(state)
    return plain


def _load_sharded(directory: Path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optimizer_state}, storage_reader=safe_reader(directory / "dcp"))
    except CheckpointException as error:  # DCP wraps each rank's failure: surface ours, name the rest
        failures = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
        ours = next((f for f in failures if isinstance(f, CheckpointError)), None)
        if ours is not None:
            raise CheckpointError(f"{directory / 'dcp'}: {ours}") from None
        first = failures[0] if failures else error
        raise CheckpointError(f"{directory / 'dcp'}: cannot load the sharded checkpoint "
                              f"({type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''})") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def load_training_state(run_dir: Path, model: nn.Module, optimizer, scheduler, engine=None) -> tuple[int, dict]:
    """Restore the checkpoint ``latest.json`` points at; returns ``(step, saved config)``."""
    try:
        latest = json.loads((run_dir / "latest.json").read_text())
        directory = run_dir / latest["dir"]
        state = json.loads((directory / "train_state.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{run_dir}: cannot resume, the training state is unreadable ({error})") from None
    sharded_checkpoint = (directory / "dcp").is_dir()
    if is_sharded(model) and not sharded_checkpoint:
        raise CheckpointError(f"{directory} was written by a run with train.parallel=ddp (or one process); resume it "
                              f"with train.parallel=ddp, or start a new run (another run name, or resume=false)")
    try:
        if sharded_checkpoint:
            _load_sharded(directory, model, optimizer)
        else:
            saved = checkpoint.load(directory / "model.safetensors")
            model.load_state_dict(saved.state_dict())
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(f"{directory}: cannot resume, the model/optimizer state does not load "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    try:
        tensors = load_file(directory / "train_state.safetensors")
        if not sharded_checkpoint:
            optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
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
    if engine is not None:
        engine.load_state_dict(state.get("engine", {}))  # gradient scaler, skipped-step counts
    return state["step"], state["config"]


def _with_defaults(saved: dict, section: str) -> dict:
    """A saved config's section with keys added since it was written filled in from today's defaults
    (a run saved before ``model.init_from`` or ``block.n_kv_heads`` existed resumes as before)."""
    try:
        return merge(recipe_defaults(saved.get("task", "lm"))[section], saved[section], section)
    except ConfigError:  # a key today's schema lacks: compare as saved (and report a different model)
        return saved[section]


#: keys whose change alters nothing that is trained: where the run lives and whether a progress bar shows
_NOT_REPORTED = ("run", "out_dir", "resume", "log.progress")
#: the keys of the learning-rate plan, which a resumed run re-plans (``replan_schedule``)
SCHEDULE_KEYS = ("train.lr", "train.steps", "train.warmup_steps", "train.schedule", "train.min_lr_ratio")
#: AdamW's settings other than the learning rate, which a resumed run takes from the config
OPTIMIZER_KEYS = ("train.betas", "train.eps", "train.weight_decay")
_ABSENT = object()


def read_saved_config(run_dir: Path) -> dict:
    """The config saved with the checkpoint ``<run_dir>/latest.json`` names (``CheckpointError`` if unreadable)."""
    try:
        latest = json.loads((run_dir / "latest.json").read_text())
        config = json.loads((run_dir / latest["dir"] / "train_state.json").read_text())["config"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{run_dir}: cannot resume, the training state is unreadable ({error}); remove "
                              f"{run_dir / 'latest.json'} to start over, or pass resume=false") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{run_dir}: cannot resume, the training state holds no config; remove "
                              f"{run_dir / 'latest.json'} to start over, or pass resume=false")
    return config


def _completed(saved: dict) -> dict:
    """A saved config with the keys added to the schema since it was written at today's defaults."""
    try:
        defaults = recipe_defaults(saved.get("task", "lm"))
    except ConfigError:
        return saved
    out = {**defaults, **saved}
    for section, default in defaults.items():
        if isinstance(default, dict) and isinstance(saved.get(section), dict):
            out[section] = _with_defaults(saved, section)
    return out


def _flat(config: dict, schema: dict, prefix: str = "") -> dict:
    """``config`` as ``{dotted key: value}``, down to the schema's keys (``model.block.norm_options`` is one)."""
    out = {}
    for key, value in config.items():
        inner = schema.get(key) if isinstance(schema, dict) else None
        if isinstance(inner, dict) and inner and isinstance(value, dict):
            out.update(_flat(value, inner, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, config: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, saved value, value now)`` for every key that differs, in the config's order (keys that
    change nothing trained, such as ``log.progress``, left out)."""
    schema = recipe_defaults(config["task"])
    old, new = _flat(_completed(saved), schema), _flat(config, schema)
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in _NOT_REPORTED]
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _show(value) -> str:
    if value is _ABSENT:
        return "(not set)"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def check_same_model(config: dict, saved: dict, run_dir: Path) -> None:
    """Refuse to resume ``saved`` (a checkpoint's config) with another task or model, naming what differs."""
    differ = [(k, old, new) for k, old, new in config_changes(saved, config) if k == "task" or k.startswith("model.")]
    if differ:
        listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in differ)
        raise ConfigError(f"{run_dir} holds a run with a different model ({listed}); pick another run name or "
                          f"resume=false")


def check_resumable(config: dict) -> None:
    """What ``resume`` and ``writable_run_dir`` check before anything is loaded or written: the run directory
    can be created and written (``check_run_dir``), and a checkpoint to resume holds the same task and model."""
    run_dir = Path(config["out_dir"]) / config["run"]
    where = f"out_dir={config['out_dir']!r}, run={config['run']!r}"
    try:
        found = config["resume"] and (run_dir / "latest.json").exists()
        check_run_dir(run_dir, where)
    except OSError as error:  # e.g. a name too long for the file system
        raise ConfigError(f"{where}: {error.strerror or error}") from None
    if found:
        check_same_model(config, read_saved_config(run_dir), run_dir)


def check_run_dir(run_dir: Path, where: str) -> None:
    """``writable_run_dir``'s check without creating or writing anything: the nearest existing directory on
    the way to ``run_dir`` is a directory this process may write (``ConfigError`` naming ``where``'s keys)."""
    existing = run_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{where}: cannot create the run directory {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write to the run directory {run_dir}: {existing} is not writable "
                          f"(permissions or a read-only file system); make it writable or pick another out_dir")


def _consequence(key: str, old, new, step: int) -> str:
    """What changing ``key`` does to a run resumed at ``step``."""
    then = f"from step {step + 1}"
    if key == "train.steps":
        if new <= step:
            return f"the checkpoint is at step {step} already: nothing is left to train (raise train.steps to go on)"
        return f"the run now ends at step {new} ({new - step} steps to go)"
    if key == "train.warmup_steps":
        return f"warmup now ends at step {new}" + (" (already past)" if new <= step else "")
    if key == "train.lr":
        return f"the new peak learning rate, {then}"
    if key == "train.schedule":
        return f"the new schedule takes over {then}"
    if key == "train.min_lr_ratio":
        return f"the decay now ends at {_show(new)} x train.lr"
    if key in OPTIMIZER_KEYS:
        return f"AdamW uses the new value {then}; its moment estimates carry over"
    if key in ("seed", "train.batch_size", "train.grad_accum") or key.startswith("data."):
        return f"batches {then} on use the new value (a batch is a function of the seed, the step and the data keys)"
    if key.startswith("log."):
        return f"the new cadence applies {then}"
    return f"applies {then}"


def _plan(train: dict) -> str:
    from ..schedulers import SCHEDULERS

    cls = SCHEDULERS[train["schedule"]]
    plan = f"{train['schedule']}, peak lr {train['lr']:g}"
    if cls.has_warmup:
        plan += f", {train['warmup_steps']} warmup steps"
    if cls.needs_total_steps:
        plan += f", decaying to {train['min_lr_ratio']:g} x lr at step {train['steps']}"
    return plan


def resume_report(run_dir: Path, step: int, changes: list, train: dict, old_lr: float, new_lr: float) -> str:
    """The message a resumed run prints: every changed key, old -> new, and what the run does about it."""
    lines = [f"resuming {run_dir} at step {step} with a config that differs from its checkpoint's:"]
    lines += [f"  {key}: {_show(old)} -> {_show(new)}: {_consequence(key, old, new, step)}" for key, old, new in changes]
    if any(key in SCHEDULE_KEYS for key, _, _ in changes):
        lines.append(f"  learning-rate schedule re-planned ({_plan(train)}); the scheduler resumes at step {step} of "
                     f"the new plan: lr {new_lr:.4g} for step {step + 1} (the checkpoint's plan: {old_lr:.4g})")
    return "\n".join(lines)


def _take_optimizer_settings(model: nn.Module, optimizer, train: dict) -> None:
    """Set AdamW's betas, eps and weight decay of every parameter group from ``train`` (as a new run would)."""
    from .optimization import build_optimizer

    for group, fresh in zip(optimizer.param_groups, build_optimizer(model, train).param_groups):
        for key in ("betas", "eps", "weight_decay"):
            group[key] = fresh[key]


def resume(config: dict, run_dir: Path, model: nn.Module, optimizer, scheduler, engine=None) -> int:
    """The step to start from: 0, or (with ``resume: true`` and a ``latest.json``) the restored checkpoint's.

    The checkpoint must hold the same task and model as ``config`` (checked before anything is loaded). The
    rest of ``config`` wins: the learning-rate plan (``SCHEDULE_KEYS``) is re-planned and the scheduler resumes
    at the checkpoint's step of the new plan (a longer ``train.steps`` stretches the decay from here), AdamW
    takes the new betas, eps and weight decay (its moment estimates carry over), and batches, evaluations and
    checkpoints follow the new keys from the next step. Every key that changed is reported on stderr (by the
    main process), old -> new, with what the run does about it.
    """
    if not (config["resume"] and (run_dir / "latest.json").exists()):
        return 0
    check_same_model(config, read_saved_config(run_dir), run_dir)
    step, saved_config = load_training_state(run_dir, model, optimizer, scheduler, engine)
    changes = config_changes(saved_config, config)
    changed = {key for key, _, _ in changes}
    old_lr = scheduler.get_last_lr()[0]
    replan_schedule(scheduler, optimizer, config["train"])
    if changed & set(SCHEDULE_KEYS):  # also a new train.schedule alone, which replan_schedule does not compare
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if changed & set(OPTIMIZER_KEYS):
        _take_optimizer_settings(model, optimizer, config["train"])
    if changes and Dist.current().is_main:
        print(resume_report(run_dir, step, changes, config["train"], old_lr, scheduler.get_last_lr()[0]),
              file=sys.stderr, flush=True)
    return step
