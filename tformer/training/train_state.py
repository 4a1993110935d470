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

import json
import os
import pickle
import random
import shutil
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


def save_training_state(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, config: dict,
                        keep: int, engine_state: dict | None = None, world: Dist | None = None,
                        sharded: bool = False) -> Path | None:
    """Write ``step_NNNNNNN/`` (model, optimizer, RNG, JSON state) atomically, then point ``latest.json`` at it.

    ``sharded`` (``train.parallel=fsdp``): every process of ``world`` must call it; the model and optimizer
    go through ``torch.distributed.checkpoint``. Otherwise only the main process calls it."""
    world = world or Dist()
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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpoint.atomic_write(run_dir / "latest.json", lambda p: Path(p).write_text(json.dumps({"step": step, "dir": name})))
    shutil.copyfile(final / "model.safetensors", run_dir / ".model.safetensors.tmp")
    os.replace(run_dir / ".model.safetensors.tmp", run_dir / "model.safetensors")
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    if sharded:
        barrier(world)
    return final


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


def resume(config: dict, run_dir: Path, model: nn.Module, optimizer, scheduler, engine=None) -> int:
    """The step to start from: 0, or (with ``resume: true`` and a ``latest.json``) the restored checkpoint's.

    The checkpoint must hold the same task and model as ``config``; the rest of ``config`` wins,
    so a longer ``train.steps`` re-plans the learning-rate decay from here.
    """
    if not (config["resume"] and (run_dir / "latest.json").exists()):
        return 0
    step, saved_config = load_training_state(run_dir, model, optimizer, scheduler, engine)
    if _with_defaults(saved_config, "model") != config["model"] or saved_config["task"] != config["task"]:
        raise ConfigError(f"{run_dir} holds a run with a different model; pick another run name or resume=false")
    replan_schedule(scheduler, optimizer, config["train"])
    return step
