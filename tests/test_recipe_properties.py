"""Property: any ``key=value`` overrides of a recipe, through the path ``tformer train --print-config`` takes
(config resolution, then ``check_recipe``: everything a run checks before its first step, without training),
either pass or stop with a tformer error (``ConfigError``; ``CheckpointError`` for a ``model.init_from`` that
is not a checkpoint) whose message names an overridden key: never a traceback of another exception type. And
what passes is really good: a small accepted config trains its first step (the oracle ``_first_step_runs``).

The default run tries a few dozen random override sets (a few seconds); ``-m slow`` runs the same property on
many more (the ``recipe-slow`` profile).
"""

import contextlib
import io
import json
import string
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tformer
from tformer.backends import BACKENDS
from tformer.cli import _recipe_config, main
from tformer.data import SEQ2SEQ_TASKS
from tformer.feedforward import ACTIVATIONS
from tformer.init import INIT_SCHEMES
from tformer.schedulers import SCHEDULERS
from tformer.tokenization import TOKENIZERS
from tformer.training import TrainingDiverged, recipe_defaults, train
from tformer.training.distributed import PARALLEL
from tformer.training.engine import PRECISIONS

settings.register_profile("recipe-default", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("recipe-slow", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])

BASE = {
    "lm": ["model.n_layers=1", "model.max_seq_len=16", "model.block.d_model=16", "model.block.n_heads=2",
           "model.block.d_ff=32", "data.seq_len=16", "data.eval_windows=4", "train.batch_size=4",
           "train.warmup_steps=2", "train.steps=10"],
    "seq2seq": ["model.n_encoder_layers=1", "model.n_decoder_layers=1", "model.block.d_model=16",
                "model.block.n_heads=2", "model.block.d_ff=32", "train.batch_size=4", "data.eval_examples=4",
                "train.warmup_steps=2", "train.steps=10"],
}
OUT_DIR = "out_dir=/nonexistent/tformer-recipe-properties"  # nothing is written; no checkpoint is found there

#: names worth trying for the keys that take one (the valid ones, and some near misses)
CHOICES = {
    "train.schedule": [*SCHEDULERS, "cosin"], "train.precision": [*PRECISIONS, "fp8"],
    "train.parallel": [*PARALLEL, "zero"], "model.positions": [*tformer.POSITIONS, "absolute"],
    "model.block.norm": [*tformer.NORMS, "deepnorm", "layrnorm"],
    "model.block.placement": [*tformer.PLACEMENTS, "middle"], "model.block.activation": [*ACTIVATIONS, "tanh"],
    "model.block.attention": [*BACKENDS, "flash"], "model.block.init": [*INIT_SCHEMES, "kaiming"],
    "model.block.qk_norm": [False, True, "head", "full", "rows"], "data.tokenizer": [*TOKENIZERS, "wordpiece"],
    "data.task": [*SEQ2SEQ_TASKS, "translate"], "device": ["auto", "cpu", "cuda", "cuda:3", "meta", "gpu"],
    "data.path": ["python_docs", "/nonexistent.txt", "README.md", "tests", ""],
    "model.init_from": ["", "/nonexistent.safetensors", "README.md"],
}
#: layer counts stay small: a huge one is a slow build, not a config error
SMALL_INTS = {"model.n_layers", "model.n_encoder_layers", "model.n_decoder_layers"}


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


LEAVES = {task: dict(_leaves(recipe_defaults(task))) for task in BASE}
TEXT = st.text(alphabet=string.ascii_letters + string.digits + " .-_:/[]{},'\"!#&*", max_size=12)
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.sampled_from([2**31, 10**12, 10**40])
    | st.floats(allow_nan=True, allow_infinity=True) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(string.ascii_lowercase, min_size=1,
                                                                        max_size=8), inner, max_size=2),
    max_leaves=4,
)


def _near(key: str, default):
    """Values close to what the key takes, so that many override sets are valid and the checks run deep."""
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 8 if key in SMALL_INTS else max(2 * default, 64))
    if isinstance(default, float):
        return st.sampled_from([0.0, 1.0, -0.5, 0.5, 1e-9, default, 2 * default])
    if key == "model.block.norm_options":
        return st.sampled_from([{}, {"warmup_iters": 3}, {"warmup_iters": "x"}, {"group_num": 3}, {"k": 0.1},
                                {"alpha_init": 0.5}, {"unit_offset": True}, {"nope": 1}])
    if key in ("model.block.n_kv_heads", "model.block.head_dim"):
        return st.sampled_from([None, 1, 2, 3, 4, 0, -1])
    if key in ("model.block.attn_scale", "model.block.attn_softcap"):
        return st.sampled_from([None, 0.5, 50.0, 0.0, -1.0])
    return ANY_VALUE


def _render(value) -> str:
    """A value as the text of a ``key=value`` argument (JSON is YAML); strings go in as typed."""
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def overrides(draw, task: str):
    """``(key, key=value text)``: a schema key with a near or arbitrary value, or an unknown key."""
    kind = draw(st.sampled_from(["known", "known", "known", "known", "arbitrary", "unknown", "task"]))
    if kind == "unknown":
        key = draw(st.sampled_from(["train.lrr", "model.block.placment", "foo", "data.path.x", "train.lr.value",
                                    "model.block.norm_options.k", "log..every", "model.blocks.norm"]))
        return key, f"{key}={_render(draw(ANY_VALUE))}"
    if kind == "task":
        return "task", f"task={_render(draw(st.sampled_from([task, 'translate', 1, [1], None])))}"
    key = draw(st.sampled_from(sorted(LEAVES[task])))
    value = draw(_near(key, LEAVES[task][key]) if kind == "known" else ANY_VALUE)
    if key in SMALL_INTS and isinstance(value, int) and not isinstance(value, bool):
        value = min(value, 8)
    return key, f"{key}={_render(value)}"


def _named(key: str, task: str) -> str:
    """What a message about this override names: the key down to its first unknown part or its first leaf."""
    node, parts = recipe_defaults(task), []
    for part in key.split("."):
        parts.append(part)
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
        if not isinstance(node, dict) or not node:
            break
    return ".".join(parts)


def _small(config: dict) -> bool:
    """Whether one step of this config is quick on a CPU (the oracle below skips larger ones)."""
    m, block = config["model"], config["model"]["block"]
    layers = m.get("n_layers", 0) + m.get("n_encoder_layers", 0) + m.get("n_decoder_layers", 0)
    d, width = block["d_model"], block["d_ff"] + 4 * block["d_model"]
    params = layers * d * width * (1 + (block["head_dim"] or 0) // 8)
    tokens = config["train"]["batch_size"] * config["train"]["grad_accum"] * config["data"].get("seq_len", 16)
    return params <= (20_000 if config["train"]["precision"] == "bf16" else 400_000) and tokens <= 8192


def _first_step_runs(task: str, items: list[str]) -> None:
    """The oracle for a config ``--print-config`` accepted: the run itself gets through its setup and first step
    without an error (``TrainingDiverged`` aside: a large learning rate may diverge, a run's outcome, not a bad
    config). Compiling and the monitor's plots are switched off for time, and the run writes to a temporary
    directory."""
    with tempfile.TemporaryDirectory() as tmp:
        quick = [f"out_dir={tmp}", "log.progress=false", "train.compile=false", "log.monitor=false"]
        config = _recipe_config(task, [*items, *quick])
        if not _small(config):
            return
        try:
            train(config, progress=False, stop_at=1)
        except TrainingDiverged:
            pass


def _check(task: str, drawn: list[tuple[str, str]], run_accepted: bool = True) -> None:
    items = [*BASE[task], OUT_DIR, *(text for _, text in drawn)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "--task", task, *items, "--print-config"])  # other exceptions fail the test
    argv = items
    if code == 0:
        assert out.getvalue().startswith("task: "), argv
        if run_accepted:
            with contextlib.redirect_stderr(io.StringIO()):
                _first_step_runs(task, items)
        return
    message = err.getvalue()
    assert code == 2 and message.startswith("tformer train: error: "), (argv, message)
    names = [_named(key, task) for key, _ in drawn]
    assert any(name in message for name in names), (argv, message)


@pytest.mark.parametrize("task", list(BASE))
@settings(settings.get_profile("recipe-default"))
@given(data=st.data())
def test_any_overrides_validate_or_name_the_key(task, data):
    _check(task, data.draw(st.lists(overrides(task), min_size=1, max_size=3)))


@pytest.mark.slow
@pytest.mark.parametrize("task", list(BASE))
@settings(settings.get_profile("recipe-slow"))
@given(data=st.data())
def test_any_overrides_validate_or_name_the_key_many_examples(task, data):
    _check(task, data.draw(st.lists(overrides(task), min_size=1, max_size=4)))


def test_the_base_configs_are_valid():
    for task in BASE:
        _check(task, [("train.lr", "train.lr=1e-3")])
