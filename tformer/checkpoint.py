"""Checkpoints: one safetensors file per model, config and format version in its metadata.

Nothing in a checkpoint is ever executed or unpickled: the header is parsed as JSON, the
tensors are read by safetensors, and the model is rebuilt from its ``spec`` (the one frozen
description each model class keeps of itself, ``tformer.spec``) stored as JSON. Format version 1
(before specs) stored the constructor arguments instead; it still loads. Every way a file can be wrong raises ``CheckpointError`` naming the
file and the problem. Writes are atomic: a temporary file in the same directory, fsync, rename.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .blocks import DecoderBlock, DecoderBlockSpec, EncoderBlock, EncoderBlockSpec
from .config import BlockConfig
from .errors import CheckpointError, ConfigError
from .models import (EncoderDecoder, EncoderDecoderSpec, EncoderModel, EncoderModelSpec, LanguageModel,
                     LanguageModelSpec)
from .norms import NORMS, block_defaults
from .placements import PLACEMENTS, LayerContext
from .stacks import Decoder, DecoderSpec, Encoder, EncoderSpec

FORMAT = "tformer"
FORMAT_VERSION = "2"
SUPPORTED_VERSIONS = ("1", FORMAT_VERSION)

#: The classes ``save`` can write and ``load`` can rebuild, by name.
SAVEABLE: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (LanguageModel, EncoderModel, EncoderDecoder, Encoder, Decoder, EncoderBlock,
                                 DecoderBlock)
}
#: Each saveable class's spec (its constructor arguments as a frozen dataclass).
SPECS = {"LanguageModel": LanguageModelSpec, "EncoderModel": EncoderModelSpec, "EncoderDecoder": EncoderDecoderSpec,
         "Encoder": EncoderSpec, "Decoder": DecoderSpec, "EncoderBlock": EncoderBlockSpec,
         "DecoderBlock": DecoderBlockSpec}


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    An interruption at any point leaves either the old file or the new one under ``path``. A failure to
    write (disk full, read-only directory, ...) raises ``OSError`` with its errno and ``path`` as filename,
    also where safetensors reports it as a ``SafetensorError``; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except SafetensorError as error:  # safetensors reports its own I/O errors as "... (os error N)"
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
        os.chmod(tmp, _new_file_mode())  # as open() would create it, not mkstemp's owner-only 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


@functools.cache
def _new_file_mode() -> int:
    """0o666 less the process's umask (read once: setting and restoring it is the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> Path:
    """``rows`` as a CSV file through ``atomic_write``; ``columns`` (default: the first row's keys) in order,
    any other key left out."""
    import csv

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def _without_block_defaults(cfg: BlockConfig) -> BlockConfig:
    """Format 1 predates ``block_defaults`` (e.g. PowerNorm's one group per head in blocks): its norms were
    built with their constructors' own defaults, so those are pinned in ``norm_options``."""
    norm = NORMS[cfg.norm]
    defaults = block_defaults(norm, cfg.d_model, cfg.n_heads)
    if not defaults:
        return cfg
    parameters = inspect.signature(norm).parameters
    standalone = {key: parameters[key].default for key in defaults}
    return dataclasses.replace(cfg, norm_options={**standalone, **cfg.norm_options})


def _decode_v1_args(value):
    """Format version 1's constructor arguments, ``{"__BlockConfig__": {...}}`` wrappers decoded."""
    if isinstance(value, dict):
        if set(value) == {"__BlockConfig__"}:
            return _without_block_defaults(BlockConfig(**value["__BlockConfig__"]))
        if set(value) == {"__LayerContext__"}:
            return LayerContext(**value["__LayerContext__"])
        return {k: _decode_v1_args(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_v1_args(v) for v in value]
    return value


def readable_args(value):
    """A stored model description (either format) as plain data for display."""
    if isinstance(value, dict):
        if "spec" in value and "class" in value:
            return value["spec"]
        if "args" in value and "class" in value:
            return readable_args(value["args"])
        if len(value) == 1 and next(iter(value)).startswith("__"):
            return readable_args(next(iter(value.values())))
        return {k: readable_args(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable_args(v) for v in value]
    return value


def _unsaveable_reason(spec) -> str | None:
    cfg = spec.cfg
    for field, registry in (("norm", NORMS), ("placement", PLACEMENTS)):
        value = getattr(cfg, field)
        if not isinstance(value, str):
            return (f"its BlockConfig has {field}={getattr(value, '__name__', value)!r}, which is not registered; a "
                    f"checkpoint stores names: register it (@tformer.{registry.kind.upper()}S.register('my_{field}') "
                    f"above the class) and pass {field}='my_{field}'")
    for field in ("placements", "encoder_placements", "decoder_placements"):
        for value in getattr(spec, field, None) or ():
            if not isinstance(value, str):
                return (f"its {field} holds {getattr(value, '__name__', value)!r}, which is not registered; register "
                        f"it with @tformer.PLACEMENTS.register(name) and pass the name")
    return None


def model_description(model: nn.Module) -> dict:
    """``{"class": name, "spec": the model's spec as JSON data}``: what ``load`` rebuilds a model from."""
    name = type(model).__name__
    if name not in SAVEABLE or not isinstance(model, SAVEABLE[name]):
        raise TypeError(f"tformer.save writes {', '.join(SAVEABLE)}; got {type(model).__name__}")
    if model.spec is None:
        raise CheckpointError(
            f"this {name} has no spec a checkpoint can rebuild it from (it was assembled from parts passed in, "
            f"attn=, ffn=, ..., or converted from a layer whose norms or dropouts differ from each other); "
            f"save its state_dict instead, or build it from a BlockConfig"
        )
    reason = _unsaveable_reason(model.spec)
    if reason:
        raise CheckpointError(f"cannot save this {name}: {reason}")
    return {"class": name, "spec": model.spec.to_dict()}


def build_model(description: dict, format_version: str = FORMAT_VERSION) -> nn.Module:
    """Rebuild a (freshly initialized) model from ``model_description``'s output (or a version-1 one)."""
    cls = SAVEABLE[description["class"]]
    if format_version == "1":
        return cls(**_decode_v1_args(description["args"]))
    return cls.from_spec(SPECS[description["class"]].from_dict(description["spec"]))


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to write and aliases (tied weights) pointing at them."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model`` (weights and buffers) to one ``.safetensors`` file at ``path``, atomically.

    The file's metadata holds the model class, its constructor arguments (config included),
    tformer's version, the format version and tied-weight aliases; ``metadata`` adds
    JSON-serializable user fields (read back with ``read_metadata``).
    """
    from . import __version__

    description = model_description(model)
    tensors, aliases = _unique_tensors(model.state_dict())
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tformer_version": __version__,
        "model": json.dumps(description),
        "aliases": json.dumps(aliases),
        "user": json.dumps(metadata or {}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _read_header(path: Path) -> dict:
    """The safetensors JSON header, checked against the file's size (never executes anything)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated: its header claims {header_len} bytes "
                f"but the file has {size}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_end = max((entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {8 + header_len + data_end} bytes but the file has {size}"
        )
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The tformer metadata of a checkpoint, parsed: format, versions, model description, user fields."""
    path = Path(path)
    metadata = _read_header(path).get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without tformer metadata (not written by tformer.save)")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is unknown; this tformer reads {', '.join(SUPPORTED_VERSIONS)}"
        )
    try:
        parsed = {k: json.loads(metadata[k]) for k in ("model", "aliases", "user")}
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: damaged tformer metadata ({type(error).__name__}: {error})") from None
    model = parsed["model"]
    body = "args" if version == "1" else "spec"
    if not isinstance(model, dict) or model.get("class") not in SAVEABLE or not isinstance(model.get(body), dict):
        raise CheckpointError(
            f"{path}: unknown model class {model.get('class') if isinstance(model, dict) else model!r}; "
            f"tformer loads {', '.join(SAVEABLE)}"
        )
    return {"format_version": version, "tformer_version": metadata.get("tformer_version"), **parsed}


def _check_dtype_kinds(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """``CheckpointError`` for a floating tensor where the model holds an integer one, or the reverse."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, the model holds "
                                  f"{expected[name].dtype} there")


def _floating_dtype(path: Path, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The one dtype of a checkpoint's floating tensors; ``CheckpointError`` naming the first tensor of another
    dtype than the most common one (by elements) if they differ."""
    elements: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    if not elements:
        return torch.get_default_dtype()
    common = max(elements, key=elements.get)
    if len(elements) > 1:
        name, tensor = next((n, t) for n, t in tensors.items() if t.is_floating_point() and t.dtype != common)
        raise CheckpointError(
            f"{path}: tensor {name!r} is {tensor.dtype} but the checkpoint's other floating tensors are {common} "
            f"(mixed dtypes: {', '.join(str(d) for d in elements)}); a model saved in one dtype holds no such "
            f"stray tensor, and nothing is cast silently: pass dtype={common} (or another floating dtype) to "
            f"tformer.load to cast every tensor to it"
        )
    return common


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model saved at ``path`` and load its weights; returned in eval mode.

    Raises ``CheckpointError`` if the file is missing, empty, truncated, not safetensors, has
    no or unknown tformer metadata, or holds tensors that do not match its config (the message
    names the tensor).

    Dtypes: nothing is cast unless asked for. With ``dtype=None`` the model comes back in the dtype its
    floating tensors have in the file (a model saved in bfloat16 loads as a bfloat16 model; integer
    buffers such as PowerNorm's step counter keep theirs). A checkpoint whose floating tensors do not
    share one dtype (a stray float16 tensor among float32 ones, which no model saved in one dtype holds)
    raises ``CheckpointError`` naming the first such tensor and both dtypes. ``dtype=torch.float32`` (any
    floating dtype) is the explicit cast: every floating tensor is converted to it, mixed or not, e.g. to
    fine-tune a bfloat16 checkpoint in float32. A floating tensor where the model holds an integer one (or
    the reverse) is a ``CheckpointError`` either way.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r} must be None (the checkpoint's own dtype) or a floating torch.dtype such "
                        f"as torch.float32 or torch.bfloat16")
    path = Path(path)
    meta = read_metadata(path)
    try:
        model = build_model(meta["model"], meta["format_version"])
    except (ConfigError, TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its config does not build a {meta['model']['class']}: {error}") from None
    try:
        tensors = load_file(path, device=str(device))
    except SafetensorError as error:
        raise CheckpointError(f"{path}: unreadable safetensors data: {error}") from None
    for alias, target in meta["aliases"].items():
        if target not in tensors:
            raise CheckpointError(f"{path}: tied tensor {alias!r} points at {target!r}, which the file lacks")
        tensors[alias] = tensors[target]
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not part of a {meta['model']['class']} with this config")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}"
            )
    _check_dtype_kinds(path, tensors, expected)
    if dtype is None:
        dtype = _floating_dtype(path, tensors)
    else:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    model.to(dtype)  # floating parameters and buffers only: integer counters keep their dtype
    model.load_state_dict(tensors)
    return model.to(device).eval()
