"""The recipe config schema: every key a training run takes, with its default, per task.

``recipe_defaults(task)`` is the schema ``tformer.recipe_config.load_config`` validates a YAML
file and ``key=value`` overrides against: an unknown key is an error, a value takes its
default's type. ``model.block`` holds every ``BlockConfig`` field (read off the dataclass, so a
new field appears here by itself) and is passed to ``BlockConfig(**block)`` unchanged.

``validate_recipe(config)`` then checks every key's value (``RULES``: type, range, choices) and the
keys that constrain each other, without reading files or building anything; ``check_recipe(config)``
adds everything else a run checks before its first step (the device, the data and tokenizer, the
model built on the meta device, the optimizer and schedule, a checkpoint to resume). ``train`` and
``tformer train --print-config`` both call ``check_recipe``, so what the one accepts the other
does. Every failure is a ``ConfigError`` (or, for an unreadable checkpoint, ``CheckpointError``)
naming the dotted key, the value given and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import BlockConfig
from ..errors import CheckpointError, ConfigError

# qk_norm takes False or a string ("head", "full"): None leaves its type free, and BlockConfig reads None as off.
_BLOCK_DEFAULTS = {**dataclasses.asdict(BlockConfig(d_model=128, n_heads=4, d_ff=512)), "attention": "auto",
                   "qk_norm": None}

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
        "precision": "fp32",
        "compile": False,
        "grad_accum": 1,
        "activation_checkpointing": False,
        "parallel": "ddp",
        "cpu_offload": False,
        "peak_tflops": 0.0,
    },
    "log": {"every": 10, "eval_every": 100, "checkpoint_every": 500, "keep_checkpoints": 2, "progress": True,
            "monitor": False, "monitor_every": 10},
}

LM_DEFAULTS = {
    "task": "lm",
    **_COMMON,
    "model": {"n_layers": 4, "max_seq_len": 256, "positions": "learned", "tie_embeddings": True,
              "block": dict(_BLOCK_DEFAULTS), "init_from": ""},
    "data": {"path": "python_docs", "seq_len": 128, "val_fraction": 0.1, "eval_windows": 64, "tokenizer": "byte",
             "vocab_size": 4096},
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
    """The defaults (and so the schema) of task ``"lm"`` or ``"seq2seq"``."""
    if not isinstance(task, str) or task not in RECIPE_DEFAULTS:
        raise ConfigError(f"task={task!r}; valid choices: {', '.join(map(repr, RECIPE_DEFAULTS))}")
    return RECIPE_DEFAULTS[task]


# ------------------------------------------------------------------------------------------------ validation
#
# A rule takes (dotted key, value) and raises ConfigError naming both and what is valid. RULES holds one per
# key of each task's schema (``model.block`` is checked as a whole by BlockConfig); a test checks that every
# key of the defaults has one, so a key added to the schema cannot go unvalidated.

Rule = Callable[[str, object], None]
_MISSING = object()


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_real(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def integer(minimum: int = 1, maximum: int | None = None, note: str = "") -> Rule:
    """An integer (not a bool) in ``[minimum, maximum]``."""
    if maximum is not None:
        wanted = f"an integer in [{minimum}, {maximum}]"
    else:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def check(key: str, value) -> None:
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            raise ConfigError(f"{key}={value!r} must be {wanted}{note}")

    return check


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           note: str = "") -> Rule:
    """A finite number above ``low`` (and below ``high``), bounds included unless ``*_open``."""
    if high is None:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(key: str, value) -> None:
        ok = _is_finite_real(value) and (value > low if low_open else value >= low)
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise ConfigError(f"{key}={value!r} must be {wanted}{note}")

    return check


def choice(choices, note: str = "") -> Rule:
    """One of the names in ``choices`` (a registry or mapping is read when checking: later registrations count)."""

    def check(key: str, value) -> None:
        names = list(choices)
        if not isinstance(value, str) or value not in names:
            close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r}; valid choices: {', '.join(map(repr, names))}{hint}{note}")

    return check


def flag(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def text(*, empty: bool = False, note: str = "") -> Rule:
    def check(key: str, value) -> None:
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise ConfigError(f"{key}={value!r} must be a {'' if empty else 'non-empty '}string{note}")

    return check


def _betas(key: str, value) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_finite_real(b) and 0.0 <= b < 1.0 for b in value)):
        raise ConfigError(f"{key}={value!r} must be two numbers in [0, 1), AdamW's beta1 and beta2, e.g. [0.9, 0.98]")


_BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockConfig))
_MODEL_KEYS = ("n_layers", "n_encoder_layers", "n_decoder_layers", "max_seq_len", "positions", "tie_embeddings",
               "init_from")


def qualify(message: str, norm_options=()) -> str:
    """A model-building error's ``field=value`` pairs written as recipe keys (``d_model=30`` ->
    ``model.block.d_model=30``, ``positions='x'`` -> ``model.positions='x'``, a norm option ``group_num=3``
    -> ``model.block.norm_options.group_num=3``)."""
    groups = (("model.block.norm_options.", tuple(norm_options)), ("model.block.", _BLOCK_FIELDS),
              ("model.", _MODEL_KEYS))
    for prefix, names in groups:
        if not names:
            continue
        pattern = r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?==)"
        message = re.sub(pattern, prefix + r"\1", message)
    return message


def _block(key: str, value) -> None:
    from ..norms import NORMS
    from ..placements import PLACEMENTS

    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be a mapping of BlockConfig fields")
    for name, registry in (("norm", NORMS), ("placement", PLACEMENTS)):
        given = value.get(name)  # a recipe names registered entries (classes and callables are for Python code)
        if given is not None and not isinstance(given, str):
            raise ConfigError(f"{key}.{name}={given!r} must be a registered name; valid choices: "
                              f"{registry.choices()}{', or deepnorm' if name == 'norm' else ''}")
    try:
        cfg = BlockConfig(**value)
    except ConfigError as error:
        message = qualify(str(error))
        raise ConfigError(message if f"{key}." in message else f"{key}: {message}") from None
    except TypeError as error:  # a field BlockConfig does not have (a config built by hand)
        raise ConfigError(f"{key}: {error}") from None
    _check_norm_option_types(key, cfg.norm, cfg.norm_options)


def _check_norm_option_types(key: str, norm: str, options: dict) -> None:
    """Each of ``norm_options`` of the type of the norm's own default for it (BlockConfig checked the names)."""
    import inspect

    from ..norms import NORMS

    parameters = inspect.signature(NORMS[norm].__init__).parameters
    for name, value in options.items():
        default = parameters[name].default
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, wanted = _is_int(value), "an integer"
        elif isinstance(default, float):
            ok, wanted = _is_finite_real(value), "a finite number"
        else:
            continue
        if not ok:
            raise ConfigError(f"{key}.norm_options.{name}={value!r} must be {wanted} for norm {norm!r} "
                              f"(its default: {default!r})")


def _grad_accum(key: str, value) -> None:
    from .engine import check_grad_accum

    check_grad_accum(value)


def _rules() -> dict[str, dict[str, Rule]]:
    from ..data import SEQ2SEQ_TASKS
    from ..embeddings import POSITIONS
    from ..schedulers import SCHEDULERS
    from ..tokenization import TOKENIZERS
    from .distributed import PARALLEL
    from .engine import PRECISIONS

    common = {
        "task": choice(RECIPE_DEFAULTS),
        "run": text(note=" (the run's directory name under out_dir)"),
        "out_dir": text(),
        "seed": integer(0, 2**32 - 1),
        "device": text(note=" ('auto', 'cpu', 'cuda', 'cuda:N', ...)"),
        "resume": flag,
        "train.steps": integer(1, note=" (the number of optimizer steps)"),
        "train.batch_size": integer(1, note=" (sequences in one forward/backward over all processes)"),
        "train.lr": number(0.0, note=" (the peak learning rate, e.g. 1e-3)"),
        "train.betas": _betas,
        "train.eps": number(0.0, note=" (AdamW's epsilon, e.g. 1e-8)"),
        "train.weight_decay": number(0.0, note=" (e.g. 0.01; 0: none)"),
        "train.grad_clip": number(0.0, note=" (the largest gradient norm; 0: no clipping)"),
        "train.schedule": choice(SCHEDULERS),
        "train.warmup_steps": integer(0, note=" (0: no warmup)"),
        "train.min_lr_ratio": number(0.0, 1.0, note=" (where a decaying schedule ends, as a fraction of train.lr)"),
        "train.precision": choice(PRECISIONS),
        "train.compile": flag,
        "train.grad_accum": _grad_accum,
        "train.activation_checkpointing": flag,
        "train.parallel": choice(PARALLEL),
        "train.cpu_offload": flag,
        "train.peak_tflops": number(0.0, note=" (per-process peak for MFU; 0: measured at start-up)"),
        "log.every": integer(1, note=" (a metrics row every that many steps)"),
        "log.eval_every": integer(1, note=" (an evaluation every that many steps)"),
        "log.checkpoint_every": integer(0, note=" (a checkpoint every that many steps; 0: none)"),
        "log.keep_checkpoints": integer(0, note=" (how many checkpoints to keep; the newest is always kept)"),
        "log.progress": flag,
        "log.monitor": flag,
        "log.monitor_every": integer(1, note=" (a monitor row every that many steps)"),
        "model.positions": choice(POSITIONS),
        "model.tie_embeddings": flag,
        "model.block": _block,
    }
    lm = {
        **common,
        "model.n_layers": integer(1),
        "model.max_seq_len": integer(1, note=" (the longest sequence the model has positions for)"),
        "model.init_from": text(empty=True, note=" (a tformer checkpoint, hf:DIR, or '' to start from scratch)"),
        "data.path": text(note=" (a UTF-8 text file, a `tformer prepare` folder, or 'python_docs')"),
        "data.seq_len": integer(1, note=" (tokens per training window)"),
        "data.val_fraction": number(0.0, 1.0, low_open=True, high_open=True,
                                    note=" (the share of the data held out for validation)"),
        "data.eval_windows": integer(1, note=" (validation windows per evaluation)"),
        "data.tokenizer": choice(TOKENIZERS),
        "data.vocab_size": integer(1, note=" (the BPE vocabulary; data.tokenizer=bpe needs at least 257)"),
    }
    seq2seq = {
        **common,
        "model.n_encoder_layers": integer(1),
        "model.n_decoder_layers": integer(1),
        "data.task": choice(SEQ2SEQ_TASKS),
        "data.vocab_size": integer(4, note=" (3 special tokens and at least one symbol)"),
        "data.min_len": integer(1, note=" (the shortest source sequence)"),
        "data.max_len": integer(1, note=" (the longest source sequence)"),
        "data.eval_examples": integer(1, note=" (validation examples per evaluation)"),
    }
    return {"lm": lm, "seq2seq": seq2seq}


RULES = _rules()


def lookup(config: Mapping, key: str, default=_MISSING):
    """``config``'s value at the dotted ``key`` (``default`` where it has none)."""
    value = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def validate_recipe(config: dict) -> None:
    """Check every key of a resolved recipe config and the keys that constrain each other, reading no file and
    building nothing: ``ConfigError`` naming the dotted key, the value given and what is valid."""
    from ..recipe_config import merge

    if not isinstance(config, Mapping):
        raise ConfigError(f"a recipe config is a mapping of keys, got {type(config).__name__}")
    task = config.get("task", "lm")
    RULES["lm"]["task"]("task", task)
    merge(recipe_defaults(task), config)  # unknown keys (with the closest valid one) and mistyped sections
    for key, rule in RULES[task].items():
        value = lookup(config, key)
        if value is _MISSING:
            raise ConfigError(f"{key} is missing from the config; build configs with tformer.recipe_config."
                              f"load_config(recipe_defaults({task!r}), ...), which fills in every default")
        rule(key, value)
    _check_together(config)


def _check_together(config: dict) -> None:
    """The rules that involve several keys."""
    from ..schedulers import SCHEDULERS
    from ..tokenization import check_tokenizer

    train, model, data = config["train"], config["model"], config["data"]
    if SCHEDULERS[train["schedule"]].needs_total_steps and train["steps"] <= train["warmup_steps"]:
        flat = [name for name, cls in SCHEDULERS.items() if not cls.needs_total_steps]
        raise ConfigError(
            f"train.steps={train['steps']} must be greater than train.warmup_steps={train['warmup_steps']}: "
            f"train.schedule={train['schedule']!r} decays from the end of warmup to train.steps; raise train.steps, "
            f"lower train.warmup_steps, or use a schedule that does not decay to an end ({', '.join(flat)})")
    block = BlockConfig(**model["block"])  # valid: its rule ran
    if model["positions"] == "rope" and block.head_size % 2 and not model.get("init_from"):
        width = (f"model.block.head_dim={block.head_dim}" if block.head_dim is not None else
                 f"model.block.d_model={block.d_model} / model.block.n_heads={block.n_heads} = {block.head_size}")
        raise ConfigError(f"model.positions='rope' rotates pairs of features and needs an even head width, got {width}; "
                          f"change the heads (or model.block.head_dim), or use model.positions=learned")
    if config["task"] == "lm":
        check_tokenizer(data["tokenizer"], data["vocab_size"])
        if not model["init_from"] and data["seq_len"] > model["max_seq_len"]:
            raise ConfigError(f"data.seq_len={data['seq_len']} exceeds model.max_seq_len={model['max_seq_len']} (the "
                              f"positions the model has); lower data.seq_len or raise model.max_seq_len")
    elif data["min_len"] > data["max_len"]:
        raise ConfigError(f"data.min_len={data['min_len']} must be <= data.max_len={data['max_len']}")


#: A byte-tokenized text file up to this size is read by ``check_recipe`` to check its length; a larger one
#: (and a text to train a BPE on) only for existence: the run reads it.
_READ_LIMIT = 64 << 20


def check_recipe(config: dict, world=None) -> None:
    """Everything a run checks before its first step, without training or writing anything.

    ``validate_recipe``, then: the device exists here, the precision and parallelism suit it, the batch splits
    over the processes, the data (``data.path``, tokenizer, windows that fit its training and validation parts)
    and ``model.init_from`` are there, the model builds (on the meta device: no memory, no time), so do the
    optimizer and schedule, and a checkpoint to resume holds the same model. ``train`` and ``tformer train
    --print-config`` call it, so the two cannot disagree.
    """
    import torch

    from .distributed import Dist, check_parallel
    from .engine import check_precision
    from .optimization import build_optimizer, build_scheduler
    from .train_state import check_resumable

    validate_recipe(config)
    world = world or Dist.current()
    device = check_device(config["device"], world)
    train = config["train"]
    check_precision(train["precision"], device)
    check_parallel(train, device)
    _check_attention(config, device)
    with torch.random.fork_rng(devices=[]):  # building on the meta device must not move the caller's RNG
        data = _check_data(config, world)
        _meta_model(config, data)
        optimizer = build_optimizer(torch.nn.Linear(1, 1, device="meta"), train)
        build_scheduler(optimizer, train)
    check_resumable(config)


def check_device(name: str, world=None):
    """``device`` resolved as the run resolves it, refused when torch has no such device here."""
    import torch

    from .distributed import resolve_device

    try:
        device = resolve_device(name, world)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; valid choices: 'auto', 'cpu', 'cuda', 'cuda:N' "
                          f"(and other torch device types this machine has)") from None
    if device.type == "meta":
        raise ConfigError("device='meta' holds no data; use device=auto, cpu or cuda")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = bool(getattr(backend, "is_available", lambda: False)())
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        raise ConfigError(f"device={name!r}: torch sees no {device.type} device on this machine; use device=cpu "
                          f"(or auto, which picks CUDA where there is one)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(f"device={name!r}: this machine has {count()} {device.type} device(s), numbered from 0")
    return device


def _check_attention(config: dict, device) -> None:
    """``attention='xformers'`` asked for explicitly must be able to run on the run's device (``auto`` picks
    what can); otherwise the run would stop at its first forward."""
    from ..backends import xformers_attention, xformers_unavailable_reason

    if config["model"]["block"].get("attention") != "xformers" or xformers_attention.kernel is not None:
        return
    if config["task"] == "lm" and config["model"]["init_from"]:
        return  # the checkpoint's config says which backend
    reason = xformers_unavailable_reason(device)
    if reason is not None:
        raise ConfigError(f"model.block.attention='xformers' cannot run here ({reason}); use model.block.attention="
                          f"auto (xformers where it can run, else SDPA) or sdpa")


def _exists(path: str, kind: str = "file") -> bool:
    try:
        return Path(path).is_file() if kind == "file" else Path(path).is_dir()
    except OSError as error:  # e.g. a name too long for the file system
        raise ConfigError(f"data.path={path!r}: {error.strerror or error}") from None


def _check_data(config: dict, world) -> dict:
    """The task's data checked as the run reads it; returns what the model is built with (``vocab_size``,
    ``max_seq_len`` for seq2seq) and, for an LM, the tokenizer's vocabulary when it is known already."""
    from ..checkpoint import read_metadata
    from ..data import BUILTIN_CORPUS, LMBatches, Seq2SeqTask, eval_windows, load_corpus
    from ..tokenization import lm_token_splits
    from .tasks import HF_PREFIX, step_batch_size

    data, train = config["data"], config["train"]
    batch = step_batch_size(train, world)
    if config["task"] == "seq2seq":
        task = Seq2SeqTask(data["task"], data["vocab_size"], data["min_len"], data["max_len"], batch, config["seed"],
                           world.rank, world.world_size)
        return {"vocab_size": task.vocab_size, "max_seq_len": task.max_seq_len}
    path, seq_len, fraction = str(data["path"]), data["seq_len"], data["val_fraction"]
    vocab_size = None  # a BPE is trained when the run starts: its size is known then
    if _exists(path, "dir") or (data["tokenizer"] == "byte" and (
            path == BUILTIN_CORPUS or (_exists(path) and Path(path).stat().st_size <= _READ_LIMIT))):
        tokenizer, train_tokens, val_tokens = lm_token_splits(data, None, write=False)
        vocab_size = tokenizer.vocab_size
        if len(train_tokens) < seq_len + 2:
            raise ConfigError(f"data.seq_len={seq_len} is too long for the training part of data.path={path!r} "
                              f"({len(train_tokens)} tokens with data.val_fraction={fraction}); lower data.seq_len "
                              f"or data.val_fraction, or give a longer text")
        if len(val_tokens) < seq_len + 1:
            raise ConfigError(f"data.seq_len={seq_len} is too long for the validation part of data.path={path!r} "
                              f"({len(val_tokens)} tokens with data.val_fraction={fraction}); lower data.seq_len "
                              f"or raise data.val_fraction")
        LMBatches(train_tokens, batch, seq_len, config["seed"], world.rank, world.world_size)
        eval_windows(val_tokens, seq_len, data["eval_windows"])
    elif path != BUILTIN_CORPUS and not _exists(path):
        load_corpus(path)  # the run's own "no such file" error
    init_from = config["model"]["init_from"]
    if init_from.startswith(HF_PREFIX):
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"model.init_from={init_from!r} needs Hugging Face transformers: "
                              f"pip install \"tformer[hf]\"")
    elif init_from:
        try:
            description = read_metadata(init_from)["model"]
        except CheckpointError as error:  # naming the file and what is wrong with it
            raise CheckpointError(f"model.init_from={init_from!r}: {error}") from None
        if description["class"] != "LanguageModel":
            raise ConfigError(f"model.init_from={init_from!r} holds a {description['class']}; an LM recipe starts "
                              f"from a LanguageModel checkpoint")
        spec = description.get("spec") or description.get("args") or {}
        limit, ids = spec.get("max_seq_len"), spec.get("vocab_size")
        if _is_int(limit) and seq_len > limit:
            raise ConfigError(f"data.seq_len={seq_len} exceeds the max_seq_len={limit} of model.init_from={init_from!r}")
        if _is_int(ids) and vocab_size is not None and ids != vocab_size:
            raise ConfigError(f"model.init_from={init_from!r} has vocab_size={ids}, but the data's tokenizer "
                              f"(data.tokenizer={data['tokenizer']}) has {vocab_size} ids")
    return {"vocab_size": vocab_size or (256 if data["tokenizer"] == "byte" else data["vocab_size"])}


def _meta_model(config: dict, data: dict) -> None:
    """Build the run's model on the meta device, through the task's own ``build_model``."""
    from types import SimpleNamespace

    import torch

    from .tasks import LanguageModelTask, SequenceToSequenceTask

    if config["task"] == "lm":
        if config["model"]["init_from"]:
            return  # the checkpoint's architecture: checked by _check_data
        stub = SimpleNamespace(init_from="", config=config, tokenizer=SimpleNamespace(vocab_size=data["vocab_size"]))
        build = LanguageModelTask.build_model
    else:
        stub = SimpleNamespace(config=config, data=SimpleNamespace(**data))
        build = SequenceToSequenceTask.build_model
    try:
        with torch.device("meta"):
            build(stub)
    except (ConfigError, TypeError, ValueError, RuntimeError, OverflowError) as error:  # (ConfigError is a ValueError)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = qualify(first, config["model"]["block"].get("norm_options") or ())
        if "model." not in message:
            block = config["model"]["block"]
            sizes = ", ".join(f"model.block.{k}={block.get(k)!r}" for k in ("d_model", "n_heads", "d_ff", "head_dim"))
            message = (f"model: the model.* keys do not build a model ({type(error).__name__}: {message}); "
                       f"the sizes: {sizes}, vocabulary {data['vocab_size']}")
        raise ConfigError(message) from None
