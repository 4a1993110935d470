"""The recipe config schema: every key a training run takes, with its default, per task.

``recipe_defaults(task)`` is the schema ``tformer.recipe_config.load_config`` validates a YAML
file and ``key=value`` overrides against: an unknown key is an error, a value takes its
default's type. ``model.block`` holds every ``BlockConfig`` field (read off the dataclass, so a
new field appears here by itself) and is passed to ``BlockConfig(**block)`` unchanged.
"""

from __future__ import annotations

import dataclasses

from ..config import BlockConfig
from ..errors import ConfigError

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
    if task not in RECIPE_DEFAULTS:
        raise ConfigError(f"task={task!r}; valid choices: {', '.join(map(repr, RECIPE_DEFAULTS))}")
    return RECIPE_DEFAULTS[task]
