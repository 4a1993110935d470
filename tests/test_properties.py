"""Property-based tests (hypothesis): every input either works or raises a tformer error that names it.

Over ``BlockConfig`` fields (valid and not), block kinds, stacks and models, dtypes, padding masks of
every wrong kind, memories, sequence lengths 0..1024 and batch sizes 0..3, each call must either

* work: a finite output of the right shape (the inputs are finite), including for empty batches and
  empty sequences, which give empty outputs everywhere (blocks, stacks, models); or
* raise ``ConfigError`` / ``CheckpointError`` / ``ValueError`` / ``TypeError`` from tformer's own code
  (never an internal traceback from torch: ``RuntimeError``, ``IndexError``, ``ZeroDivisionError``,
  ``AttributeError``, ``KeyError``, ...) whose message names the offending argument or field.

Valid results also have finite gradients (float32/float64) and finite running statistics. The default
profile is derandomized (the same 150 examples per test on every run, about 15 s for the file); the
``slow`` variants draw 400 random examples per test (under a minute: ``pytest -m slow
tests/test_properties.py``; ``--hypothesis-seed=N`` replays a run).
"""

from __future__ import annotations

import math
import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from conftest import quick_norm_options
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import tformer
from tformer.errors import CheckpointError, ConfigError

TFORMER_DIR = Path(tformer.__file__).resolve().parent
CLEAN_ERRORS = (ConfigError, CheckpointError, ValueError, TypeError)
NORMS = list(tformer.NORMS)
PLACEMENTS = list(tformer.PLACEMENTS)
ACTIVATIONS = list(tformer.ACTIVATIONS)
INITS = list(tformer.INIT_SCHEMES)
POSITIONS = list(tformer.POSITIONS)
CPU_BACKENDS = ["auto", "sdpa", "math"]  # xformers needs CUDA: refusing it is a case of the config test
CONFIG_FIELDS = [f for f in tformer.BlockConfig.__dataclass_fields__]

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def property_test(**strategies):
    """``@given(**strategies)`` twice: the fast profile, and a ``slow``-marked copy drawing more random examples.

    ``test_x, test_x_slow = property_test(...)(body)`` (pytest collects both names)."""
    def decorate(body):
        return FAST(given(**strategies)(body)), pytest.mark.slow(SLOW(given(**strategies)(body)))

    return decorate


def check_clean_error(error: BaseException, *names: str) -> None:
    """``error`` is one of tformer's errors, raised by tformer's own code, naming one of ``names``."""
    frames = traceback.extract_tb(error.__traceback__)
    where = Path(frames[-1].filename).resolve() if frames else None
    detail = f"{type(error).__name__}: {error}\n" + "".join(traceback.format_tb(error.__traceback__)[-3:])
    assert isinstance(error, CLEAN_ERRORS), f"an internal error escaped: {detail}"
    assert where is not None and where.is_relative_to(TFORMER_DIR), f"raised inside {where}, not by tformer: {detail}"
    if names:
        assert any(name in str(error) for name in names), f"the message names none of {names}: {error}"


def check_output(out, shape: tuple) -> None:
    assert isinstance(out, torch.Tensor), type(out)
    assert tuple(out.shape) == tuple(shape), (tuple(out.shape), shape)
    assert bool(torch.isfinite(out).all()), "a non-finite output from finite, valid input"


# ------------------------------------------------------------------------------------------------ strategies

@st.composite
def valid_configs(draw, *, even_d_model: bool = False) -> tformer.BlockConfig:
    """A valid ``BlockConfig`` over every field the block factory reads, at tiny sizes."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([None, None, 2, 4, 6]))
    if head_dim is None:
        d_model = n_heads * draw(st.sampled_from([2, 4]))
    else:
        d_model = draw(st.sampled_from([4, 6, 8] if even_d_model else [3, 4, 5, 6, 8]))
    norm = draw(st.sampled_from(NORMS + ["deepnorm"]))
    attention = draw(st.sampled_from(CPU_BACKENDS))
    return tformer.BlockConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([None] + [k for k in (1, 2, 4) if n_heads % k == 0])),
        head_dim=head_dim,
        d_ff=draw(st.sampled_from([1, 4, 8, 16])),
        norm=norm,
        placement=None if norm == "deepnorm" else draw(st.sampled_from(PLACEMENTS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        attn_dropout=draw(st.sampled_from([0.0, 0.0, 0.2])),
        bias=draw(st.booleans()),
        norm_bias=draw(st.sampled_from([None, True, False])),
        attn_bias=draw(st.sampled_from([None, True, False])),
        ffn_bias=draw(st.sampled_from([None, True, False])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12, 0.1])),
        attention=attention,
        qk_norm=draw(st.sampled_from([False, "head", "full", True])),
        init=draw(st.sampled_from(INITS)),
        norm_options=quick_norm_options("layernorm" if norm == "deepnorm" else norm) if draw(st.booleans()) else {},
        rope_base=draw(st.sampled_from([10000.0, 500000.0, 2.0])),
        attn_scale=draw(st.sampled_from([None, None, 0.1, 1.0])),
        attn_softcap=draw(st.sampled_from([None, None, 5.0])) if attention != "sdpa" else None,
    )


def finite_floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


ODD_VALUES = st.sampled_from([math.nan, math.inf, -math.inf, "0.1", None, True, [1], 2.5])

#: per field: (valid values, invalid values); either may still fail in combination (n_heads vs d_model, ...)
FIELD_VALUES = {
    "d_model": (st.sampled_from([4, 8, 12]), st.sampled_from([0, -4, 2, 3, 5, 6])),
    "n_heads": (st.sampled_from([1, 2, 4]), st.sampled_from([0, -1, 3, 5])),
    "d_ff": (st.sampled_from([1, 4, 8]), st.sampled_from([0, -1])),
    "n_kv_heads": (st.sampled_from([None, None, 1]), st.sampled_from([0, -1, 2, 3, 5])),
    "head_dim": (st.sampled_from([None, 2, 4]), st.sampled_from([0, -1, 1, 3, 5])),
    "norm": (st.sampled_from(NORMS + ["deepnorm"]), st.sampled_from(["bogus", 3])),
    "placement": (st.sampled_from(PLACEMENTS + [None]), st.sampled_from(["bogus", 3])),
    "activation": (st.sampled_from(ACTIVATIONS), st.sampled_from(["bogus", None])),
    "dropout": (finite_floats(0.0, 0.9), st.sampled_from([-0.1, 1.0, 1.5])),
    "attn_dropout": (finite_floats(0.0, 0.9), st.sampled_from([-0.1, 1.0, 1.5])),
    "bias": (st.booleans(), st.sampled_from([None, 1, "yes"])),
    "norm_bias": (st.sampled_from([None, True, False]), st.sampled_from([1, "yes"])),
    "attn_bias": (st.sampled_from([None, True, False]), st.sampled_from([1, "yes"])),
    "ffn_bias": (st.sampled_from([None, True, False]), st.sampled_from([1, "yes"])),
    "norm_eps": (st.sampled_from([1e-5, 1e-12, 0.5]), st.sampled_from([0.0, -1e-5])),
    "attention": (st.sampled_from(CPU_BACKENDS + ["xformers"]), st.sampled_from(["bogus", None])),
    "qk_norm": (st.sampled_from([False, True, "head", "full", None]), st.sampled_from(["rows", 1])),
    "init": (st.sampled_from(INITS), st.sampled_from(["bogus", None])),
    "norm_options": (st.sampled_from([{}] * 6 + [{"warmup_iters": 2}, {"alpha_init": 0.5}, {"group_num": 2}]),
                     st.sampled_from([{"bogus": 1}, "x", {"group_num": 3}])),
    "rope_base": (st.sampled_from([10000.0, 2.0]), st.sampled_from([1.0, 0.5, -3.0])),
    "attn_scale": (st.sampled_from([None, 0.1]), st.sampled_from([0.0, -1.0])),
    "attn_softcap": (st.sampled_from([None, 5.0]), st.sampled_from([0.0, -2.0])),
}


@st.composite
def raw_config_fields(draw) -> dict:
    """Keyword arguments for ``BlockConfig``: about half the fields set, each valid or now and then invalid
    (a wrong value, a wrong type, NaN or inf), so that valid and invalid configs both come up often."""
    fields = {}
    for name, (valid, invalid) in FIELD_VALUES.items():
        if name in ("d_model", "n_heads", "d_ff") or draw(st.booleans()):
            pick = draw(st.sampled_from(["valid"] * 22 + ["invalid", "odd"]))  # shrinks towards valid
            fields[name] = draw({"valid": valid, "invalid": invalid, "odd": ODD_VALUES}[pick])
    return fields


def padding_mask_for(draw, batch: int, seq: int, kind: str):
    """A padding mask of ``kind``: None, a valid one (no, some or only padding; often one row all padding),
    or one of every wrong sort."""
    if kind == "none":
        return None
    if kind == "ok":
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        mask = torch.rand(batch, seq, generator=generator) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        if batch and draw(st.booleans()):
            mask[draw(st.integers(0, batch - 1))] = True
        return mask
    return {
        "rank": lambda: torch.zeros(batch, dtype=torch.bool),
        "rank3": lambda: torch.zeros(batch, seq, 1, dtype=torch.bool),
        "length": lambda: torch.zeros(batch, seq + 1, dtype=torch.bool),
        "batch": lambda: torch.zeros(batch + 1, seq, dtype=torch.bool),
        "float": lambda: torch.zeros(batch, seq),
        "int": lambda: torch.zeros(batch, seq, dtype=torch.long),
        "list": lambda: [[False] * seq] * batch,
    }[kind]()


MASK_KINDS = ["ok"] * 5 + ["none"] * 4 + ["rank", "rank3", "length", "batch", "float", "int", "list"]
FLOAT_DTYPES = [torch.float32, torch.float64]
INPUT_DTYPES = FLOAT_DTYPES * 4 + [torch.float16, torch.bfloat16, torch.long, torch.bool]
MODULE_DTYPES = FLOAT_DTYPES * 3 + [torch.bfloat16, torch.float16]  # half precision runs on the CPU too


@st.composite
def batch_and_seq(draw):
    """``(batch, seq)`` with 0 and 1 included; now and then a long sequence (up to 1024) at batch <= 1."""
    if draw(st.sampled_from(["short"] * 9 + ["long"])) == "long":
        return draw(st.sampled_from([1, 0])), draw(st.sampled_from([257, 640, 1024]))
    return draw(st.sampled_from([2, 1, 3, 0])), draw(st.sampled_from([5, 1, 2, 3, 4, 6, 7, 8, 9, 0]))


def make_input(batch: int, seq: int, d: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    x = torch.randn(batch, seq, d, dtype=torch.float64) * scale
    return x.to(dtype) if dtype.is_floating_point else (x > 0).to(dtype)


# ------------------------------------------------------------------------------------------------ configs

def config_body(fields, kind, training):
    """Any field values: ``BlockConfig`` and the block either build and run, or raise ``ConfigError`` naming a field."""
    torch.manual_seed(0)
    try:
        cfg = tformer.BlockConfig(**fields)
        if kind in ("encoder", "rope"):
            block = tformer.EncoderBlock(cfg, rope=kind == "rope")
        else:
            block = tformer.DecoderBlock(cfg, cross_attention=kind == "cross")
    except Exception as error:  # noqa: BLE001  (what it is, is the property)
        event(f"refused config ({str(error).split('=')[0].split()[-1]})")
        check_clean_error(error, *CONFIG_FIELDS)
        return
    event(f"built, attention={cfg.attention}")
    block.train(training)
    x = torch.randn(2, 3, cfg.d_model)
    try:
        out = block(x, memory=torch.randn(2, 4, cfg.d_model)) if kind == "cross" else block(x)
    except Exception as error:  # noqa: BLE001
        check_clean_error(error, "attention")  # only a backend that cannot run here (xformers) may refuse
        assert cfg.attention == "xformers", f"a valid config failed at run time: {error!r}"
        return
    check_output(out, x.shape)


test_config_builds_a_working_block_or_raises_config_error, test_config_slow = property_test(
    fields=raw_config_fields(), kind=st.sampled_from(["encoder", "decoder", "cross", "rope"]), training=st.booleans(),
)(config_body)


# ------------------------------------------------------------------------------------------------ blocks, stacks

BLOCK_KINDS = ["encoder", "encoder-rope", "decoder", "decoder-noncausal", "cross"]
STACK_KINDS = ["encoder", "decoder", "cross"]


def _run_case(module, x, pad, memory=None, memory_pad=None, *, cross: bool):
    if cross:
        return module(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    return module(x, padding_mask=pad)


@st.composite
def io_cases(draw, kinds):
    """A module kind, a valid config, the module's dtype and mode, and inputs of every valid and invalid sort."""
    cfg = draw(valid_configs())
    kind = draw(st.sampled_from(kinds))
    batch, seq = draw(batch_and_seq())
    module_dtype = draw(st.sampled_from(MODULE_DTYPES))
    x_dtype = draw(st.sampled_from(INPUT_DTYPES)) if draw(st.sampled_from([0] * 5 + [1])) else module_dtype
    x_width = cfg.d_model + draw(st.sampled_from([0] * 9 + [1]))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    case = dict(cfg=cfg, kind=kind, batch=batch, seq=seq, module_dtype=module_dtype, x_dtype=x_dtype, x_width=x_width,
                mask_kind=mask_kind, pad=padding_mask_for(draw, batch, seq, mask_kind),
                scale=draw(st.sampled_from([1.0, 1.0, 0.0, 1e-3, 100.0])), training=draw(st.booleans()),
                seed=draw(st.integers(0, 3)))
    if kind == "cross":
        mem_seq = draw(st.integers(0, 6))
        case.update(memory_kind=draw(st.sampled_from(["ok"] * 10 + ["none", "batch", "width", "dtype", "rank"])),
                    mem_seq=mem_seq, memory_mask_kind=draw(st.sampled_from(MASK_KINDS)))
        case["memory_pad"] = padding_mask_for(draw, batch, mem_seq, case["memory_mask_kind"])
    return case


def _memory(case) -> torch.Tensor | None:
    batch, d, dtype, mem_seq = case["batch"], case["cfg"].d_model, case["module_dtype"], case["mem_seq"]
    other = torch.float32 if dtype == torch.float64 else torch.float64
    return {
        "ok": lambda: torch.randn(batch, mem_seq, d, dtype=dtype),
        "none": lambda: None,
        "batch": lambda: torch.randn(batch + 1, mem_seq, d, dtype=dtype),
        "width": lambda: torch.randn(batch, mem_seq, d + 2, dtype=dtype),
        "dtype": lambda: torch.randn(batch, mem_seq, d, dtype=other),
        "rank": lambda: torch.randn(mem_seq, d, dtype=dtype),
    }[case["memory_kind"]]()


def _expected_errors(case) -> list[str]:
    """What an error must mention for the case's invalid arguments ([] when every argument is valid)."""
    names = []
    if case["x_dtype"] != case["module_dtype"] or case["x_width"] != case["cfg"].d_model:
        names += ["x has", "x must"]
    if case["mask_kind"] not in ("none", "ok"):
        names += ["padding mask for x"]
    if case["kind"] == "cross":
        if case["memory_kind"] != "ok":
            names += ["memory"]
        if case["memory_mask_kind"] not in ("none", "ok"):
            names += ["padding mask for memory"]
    return names


def _check_case(module, case):
    torch.manual_seed(case["seed"])
    module.to(case["module_dtype"]).train(case["training"])
    x = make_input(case["batch"], case["seq"], case["x_width"], case["x_dtype"], case["scale"])
    x.requires_grad_(x.is_floating_point())
    cross = case["kind"] == "cross"
    memory = _memory(case) if cross else None
    expected = _expected_errors(case)
    event("valid input" if not expected else f"invalid: {expected[0]}")
    note(f"expected errors naming {expected}")
    try:
        out = _run_case(module, x, case["pad"], memory, case.get("memory_pad"), cross=cross)
    except Exception as error:  # noqa: BLE001
        assert expected, f"valid input refused: {error!r}"
        check_clean_error(error, *expected)
        return
    assert not expected, f"invalid input accepted (expected an error naming {expected})"
    check_output(out, (case["batch"], case["seq"], case["cfg"].d_model))
    check_backward_and_state(module, out, x)


def check_backward_and_state(module, out, x) -> None:
    """Valid input: finite gradients for the input and every parameter, finite running statistics."""
    for name, buffer in module.named_buffers():
        assert bool(torch.isfinite(buffer.float()).all()), f"buffer {name} went non-finite"
    if not out.requires_grad or out.dtype not in FLOAT_DTYPES:
        return  # half precision: forward only (a zero-variance token's LayerNorm gradient, 1/sqrt(eps) per
        # post-LN sublayer, overflows float16's range in two sublayers, as in torch.nn; training uses autocast)
    weights = torch.randn_like(out)  # not out.sum(): a gradient a norm cannot cancel
    inputs = [x] if x.requires_grad else []
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), inputs + params, allow_unused=True)
    names = (["x"] if inputs else []) + [n for n, p in module.named_parameters() if p.requires_grad]
    for name, grad in zip(names, grads):
        assert grad is None or bool(torch.isfinite(grad).all()), f"a non-finite gradient for {name}"


def _block(case):
    cfg, kind = case["cfg"], case["kind"]
    if kind.startswith("encoder"):
        return tformer.EncoderBlock(cfg, rope=kind == "encoder-rope")
    return tformer.DecoderBlock(cfg, cross_attention=kind == "cross", causal=kind != "decoder-noncausal")


def block_body(case):
    _check_case(_block(case), case)


test_block_inputs_work_or_raise_named_errors, test_block_inputs_slow = property_test(
    case=io_cases(BLOCK_KINDS))(block_body)


def _stack(case, n_layers: int, final_norm):
    cfg, kind = case["cfg"], case["kind"]
    if kind == "encoder":
        return tformer.Encoder(cfg, n_layers, final_norm=final_norm, rope=case["seed"] % 2 == 0)
    return tformer.Decoder(cfg, n_layers, cross_attention=kind == "cross", final_norm=final_norm)


def stack_body(case, n_layers, final_norm, pack):
    stack = _stack(case, n_layers, final_norm)
    stack.pack_padding = pack
    _check_case(stack, case)


test_stack_inputs_work_or_raise_named_errors, test_stack_inputs_slow = property_test(
    case=io_cases(STACK_KINDS), n_layers=st.integers(1, 3), final_norm=st.sampled_from([None, True, False]),
    pack=st.booleans(),
)(stack_body)


# ------------------------------------------------------------------------------------------------ models

def _ids(draw, batch: int, seq: int, vocab: int, kind: str):
    """Token ids of ``kind``: valid (long or int32, in range) or out of range, of a wrong dtype or rank, a list."""
    if kind in ("ok", "int32"):
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        return ids.int() if kind == "int32" else ids
    ok = torch.zeros(batch, seq, dtype=torch.long)
    return {
        "high": lambda: ok + vocab + draw(st.integers(0, 3)),
        "negative": lambda: ok - 1,
        "float": lambda: ok.float(),
        "bool": lambda: ok.bool(),
        "rank1": lambda: ok.reshape(-1),
        "rank3": lambda: ok[..., None],
        "list": lambda: ok.tolist(),
    }[kind]()


def ids_are_invalid(kind: str, batch: int, seq: int) -> bool:
    """Whether ids of ``kind`` must be refused: out-of-range values only count where there is an id at all."""
    if kind in ("high", "negative"):
        return batch * seq > 0
    return kind not in ("ok", "int32")


ID_KINDS = ["ok"] * 6 + ["int32", "high", "negative", "float", "bool", "rank1", "rank3", "list"]


@st.composite
def model_cases(draw):
    cfg = draw(valid_configs())
    kind = draw(st.sampled_from(["lm", "encoder_model", "encdec"]))
    positions = draw(st.sampled_from(POSITIONS))
    if positions == "rope" and cfg.head_size % 2:
        positions = "learned"
    vocab = draw(st.integers(1, 12))
    batch, seq = draw(batch_and_seq())
    id_kind = draw(st.sampled_from(ID_KINDS))
    case = dict(cfg=cfg, kind=kind, positions=positions, vocab=vocab, max_seq_len=draw(st.sampled_from([4, 16, 1024])),
                batch=batch, seq=seq, id_kind=id_kind, ids=_ids(draw, batch, seq, vocab, id_kind),
                mask_kind=draw(st.sampled_from(MASK_KINDS)), training=draw(st.booleans()),
                n_layers=draw(st.integers(1, 2)), tie=draw(st.booleans()))
    case["pad"] = padding_mask_for(draw, batch, seq, case["mask_kind"])
    if kind == "encdec":
        src_seq = draw(st.integers(0, 6))
        src_batch = batch + draw(st.sampled_from([0] * 6 + [1]))
        case.update(src_seq=src_seq, src_batch=src_batch, src=_ids(draw, src_batch, src_seq, vocab, "ok"),
                    src_pad=padding_mask_for(draw, src_batch, src_seq, draw(st.sampled_from(["none", "ok"]))))
    if kind == "encoder_model":
        case["n_token_types"] = draw(st.integers(0, 2))
        case["types_kind"] = draw(st.sampled_from(["none", "none", "ok", "high", "shape"]))
    return case


def _model(case):
    cfg = case["cfg"]
    if case["kind"] == "lm":
        return tformer.LanguageModel(cfg, case["n_layers"], case["vocab"], case["max_seq_len"],
                                     positions=case["positions"], tie_embeddings=case["tie"])
    if case["kind"] == "encoder_model":
        return tformer.EncoderModel(cfg, case["n_layers"], case["vocab"], case["max_seq_len"],
                                    positions=case["positions"], n_token_types=case["n_token_types"])
    return tformer.EncoderDecoder(cfg, 1, case["n_layers"], case["vocab"], max_seq_len=case["max_seq_len"],
                                  positions=case["positions"], tie_embeddings=case["tie"])


def model_body(case):
    torch.manual_seed(0)
    model = _model(case).train(case["training"])
    batch, seq, tokens = case["batch"], case["seq"], case["ids"]
    argument = "tgt_tokens" if case["kind"] == "encdec" else "tokens"
    names = []
    if ids_are_invalid(case["id_kind"], batch, seq):
        names.append(argument)
    elif seq > case["max_seq_len"]:
        names.append("max_seq_len")
    if case["mask_kind"] not in ("none", "ok"):
        names.append("padding mask for x")
    kwargs = {}
    if case["kind"] == "encdec":
        if case["src_batch"] != batch:
            names.append("src_tokens")
        if case["src_seq"] > case["max_seq_len"]:
            names.append("max_seq_len")
        call = lambda: model(case["src"], tokens, src_padding_mask=case["src_pad"], tgt_padding_mask=case["pad"])
        width = case["vocab"]
    else:
        if case["kind"] == "encoder_model" and case["types_kind"] != "none":
            n_types, types_kind = case["n_token_types"], case["types_kind"]
            if types_kind == "shape":
                kwargs["token_type_ids"] = torch.zeros(batch, seq + 1, dtype=torch.long)
            else:
                kwargs["token_type_ids"] = torch.full((batch, seq), n_types if types_kind == "high" else 0)
            if n_types == 0 or types_kind == "shape" or (types_kind == "high" and batch * seq > 0):
                names.append("token_type_ids")
        call = lambda: model(tokens, padding_mask=case["pad"], **kwargs)
        width = case["vocab"] if case["kind"] == "lm" else case["cfg"].d_model
    event("valid input" if not names else f"invalid: {names[0]}")
    note(f"expected errors naming {names}")
    try:
        out = call()
    except Exception as error:  # noqa: BLE001
        assert names, f"valid input refused: {error!r}"
        check_clean_error(error, *names)
        return
    assert not names, f"invalid input accepted (expected an error naming {names})"
    check_output(out, (batch, seq, width))


test_model_inputs_work_or_raise_named_errors, test_model_inputs_slow = property_test(case=model_cases())(model_body)


def generate_body(cfg, vocab, batch, prompt_len, prompt_kind, max_new_tokens, temperature, top_k, eos, pad_id,
                  use_cache, data):
    torch.manual_seed(0)
    model = tformer.LanguageModel(cfg, 1, vocab, 8, positions="rope" if cfg.head_size % 2 == 0 else "learned")
    prompt = _ids(data.draw, batch, prompt_len, vocab, prompt_kind)
    names = []
    if ids_are_invalid(prompt_kind, batch, prompt_len) or prompt_len == 0:
        names.append("prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        names.append("max_new_tokens")
    elif prompt_len + max_new_tokens > 8:
        names.append("max_seq_len")
    if not temperature >= 0:
        names.append("temperature")
    if temperature != 0 and top_k == 0:
        names.append("top_k")
    if eos is not None and pad_id == 1000:
        names.append("pad_token_id")
    event("valid input" if not names else f"invalid: {names[0]}")
    note(f"expected errors naming {names}")
    try:
        out = model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, eos_token_id=eos,
                             pad_token_id=pad_id, use_cache=use_cache)
    except Exception as error:  # noqa: BLE001
        assert names, f"valid input refused: {error!r}"
        check_clean_error(error, *names)
        return
    assert not names, f"invalid input accepted (expected an error naming {names})"
    assert out.shape[0] == batch and prompt_len <= out.shape[1] <= prompt_len + max_new_tokens
    assert torch.equal(out[:, :prompt_len], prompt.long())
    assert bool(((out >= 0) & (out < vocab)).all())


test_generate_works_or_raises_named_errors, test_generate_slow = property_test(
    cfg=valid_configs(even_d_model=True), vocab=st.integers(1, 9), batch=st.integers(0, 3),
    prompt_len=st.sampled_from([1, 2, 3, 4, 0]), prompt_kind=st.sampled_from(["ok"] * 5 + ["int32", "high", "negative", "float", "rank1"]),
    max_new_tokens=st.sampled_from([3, 1, 0, 6, 3, -1, 2.5, True]),
    temperature=st.sampled_from([0, 1.0, 0.0, 0.7, 1.0, -1.0, math.nan]), top_k=st.sampled_from([None, 1, 3, 0, 100]),
    eos=st.sampled_from([None, 0, [0, 1]]), pad_id=st.sampled_from([None, 0, 1000]), use_cache=st.booleans(),
    data=st.data(),
)(generate_body)


# ------------------------------------------------------------------------------------------------ checkpoints, debug

def checkpoint_body(cfg, save_dtype, load_dtype, stray):
    """A checkpoint loads in its own dtype (or the one asked for); a stray tensor of another dtype is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = tformer.Encoder(cfg, 1).to(save_dtype).eval()
    asked = isinstance(load_dtype, torch.dtype) and load_dtype.is_floating_point
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.safetensors")
        tformer.save(model, path)
        if stray:
            with safe_open(path, "pt") as f:
                metadata = f.metadata()
            tensors = load_file(path)
            name = min((n for n, t in tensors.items() if t.is_floating_point()), key=lambda n: tensors[n].numel())
            tensors[name] = tensors[name].to(torch.float16)
            save_file(tensors, path, metadata=metadata)
        try:
            loaded = tformer.load(path, dtype=load_dtype)
        except Exception as error:  # noqa: BLE001
            check_clean_error(error, "dtype")
            assert (stray and load_dtype is None) or (load_dtype is not None and not asked), f"refused: {error}"
            return
    assert load_dtype is None or asked, f"dtype={load_dtype!r} accepted"
    assert not stray or asked, "a stray tensor of another dtype loaded silently"
    want = save_dtype if load_dtype is None else load_dtype
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {want}
    x = torch.randn(2, 3, cfg.d_model, dtype=want)
    check_output(loaded(x), x.shape)


test_checkpoint_dtypes_load_faithfully_or_raise, test_checkpoint_dtypes_slow = property_test(
    cfg=valid_configs(even_d_model=True), save_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    load_dtype=st.sampled_from([None, None, torch.float32, torch.float64, torch.bfloat16, "float32", torch.long]),
    stray=st.booleans(),
)(checkpoint_body)


def debug_body(case, mode, poison):
    """With debug checks on, a non-finite ``x`` raises ``ValueError`` naming it; off, nothing is checked."""
    if _expected_errors(case) or case["batch"] * case["seq"] == 0:
        return  # the other tests cover invalid and empty inputs
    stack = _stack(case, 2, None).to(case["module_dtype"]).train(case["training"])
    x = make_input(case["batch"], case["seq"], case["cfg"].d_model, case["module_dtype"], 1.0)
    if poison != "none":
        x[-1, -1, 0] = float(poison)
    memory = _memory(case) if case["kind"] == "cross" else None
    with tformer.debug_checks(mode):
        try:
            out = _run_case(stack, x, case["pad"], memory, case.get("memory_pad"), cross=case["kind"] == "cross")
        except ValueError as error:
            check_clean_error(error, "x (the input")
            assert mode and poison != "none", f"refused: {error}"
            return
    assert not (mode and poison != "none"), "a non-finite input passed the debug checks"
    if poison == "none":
        check_output(out, x.shape)


test_debug_checks_name_non_finite_inputs, test_debug_checks_slow = property_test(
    case=io_cases(STACK_KINDS), mode=st.sampled_from([False, True, "inputs", "blocks"]),
    poison=st.sampled_from(["nan", "inf", "-inf", "none"]),
)(debug_body)
