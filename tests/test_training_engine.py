"""The training step's engines: gradient accumulation, bf16 autocast, the fp16 scaler's skipped steps,
torch.compile with its fallback, activation checkpointing, and the metrics they add."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import tformer
from conftest import NORMS, quick_norm_options
from tformer import ConfigError
from tformer.recipe_config import load_config
from tformer.training import recipe_defaults, train
from tformer.training.engine import MAX_CONSECUTIVE_SKIPS, StepEngine, check_precision

TINY_LM = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "data.seq_len=32", "data.eval_windows=8", "train.warmup_steps=2", "log.every=1",
    "log.eval_every=3", "log.progress=false", "log.checkpoint_every=100",
]
TINY_SEQ2SEQ = [
    "model.block.d_model=32", "model.block.n_heads=2", "model.block.d_ff=64", "data.eval_examples=8", "log.every=1",
    "log.eval_every=3", "log.progress=false", "train.warmup_steps=2", "log.checkpoint_every=100",
]


def run(tmp_path, name, *overrides, task="lm", **kwargs):
    base = TINY_LM if task == "lm" else TINY_SEQ2SEQ
    config = load_config(recipe_defaults(task), None, [*base, f"out_dir={tmp_path}", f"run={name}", *overrides])
    return train(config, **kwargs)


def rows(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def weights(tmp_path, name):
    return tformer.load(tmp_path / name / "model.safetensors").state_dict()


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("task", ["lm", "seq2seq"])
def test_grad_accum_updates_like_a_larger_batch(tmp_path, task):
    """batch_size=2 x grad_accum=4 and 4 x 2 take the steps 8 x 1 takes (seq2seq: micro-batches with different
    numbers of target tokens, weighted so the sum is the full batch's token mean), to float rounding."""
    # attn_bias=false: the key bias has an exactly-zero true gradient (softmax ignores it), so its gradient is
    # rounding noise that Adam normalizes into lr-sized steps of arbitrary sign: no tolerance could hold for it
    common = ["train.steps=4", "train.lr=3e-3", "model.block.dropout=0.0", "model.block.attn_bias=false"]
    run(tmp_path, "full", *common, "train.batch_size=8", task=task)
    for bs, k in [(4, 2), (2, 4)]:
        run(tmp_path, f"accum{k}", *common, f"train.batch_size={bs}", f"train.grad_accum={k}", task=task)
        assert_same_weights(weights(tmp_path, "full"), weights(tmp_path, f"accum{k}"), atol=2e-6)
        losses = [r["loss"] for r in rows(tmp_path, f"accum{k}") if "loss" in r]
        assert losses == pytest.approx([r["loss"] for r in rows(tmp_path, "full") if "loss" in r], rel=1e-5)
    # without the token weighting, padded seq2seq micro-batches would not match: the test can fail
    with pytest.raises(ConfigError, match="train.grad_accum=0 must be an integer >= 1"):
        run(tmp_path, "zero", "train.grad_accum=0", task=task)


def test_grad_accum_and_bf16_resume_bitwise(tmp_path):
    common = ["train.steps=6", "train.batch_size=4", "train.grad_accum=2", "train.precision=bf16",
              "model.block.dropout=0.1", "log.checkpoint_every=3"]
    run(tmp_path, "straight", *common)
    run(tmp_path, "stopped", *common, stop_at=4)
    run(tmp_path, "stopped", *common)
    assert_same_weights(weights(tmp_path, "straight"), weights(tmp_path, "stopped"), atol=0)


def test_bf16_trains_close_to_fp32_and_logs_bits_per_byte(tmp_path):
    common = ["train.steps=30", "train.lr=3e-3", "train.batch_size=8", "log.eval_every=30"]
    fp32 = run(tmp_path, "fp32", *common)
    bf16 = run(tmp_path, "bf16", *common, "train.precision=bf16")
    assert bf16.final["val_loss"] < 4.0  # it trains (the uniform guess is ln 256 = 5.55)
    assert bf16.final["val_loss"] == pytest.approx(fp32.final["val_loss"], rel=0.03)
    for result in (fp32, bf16):
        assert result.final["bits_per_byte"] == pytest.approx(result.final["val_loss"] / math.log(2), rel=1e-9)
    train_rows = [r for r in rows(tmp_path, "bf16") if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    fp32_rows = [r for r in rows(tmp_path, "fp32") if "loss" in r]
    assert all(0 < r["mfu"] < 1 for r in fp32_rows[1:])  # model FLOPs over a matmul peak measured at start-up
    assert tformer.load(tmp_path / "bf16" / "model.safetensors").embedding.tokens.weight.dtype == torch.float32


def test_precision_errors_name_the_choices():
    with pytest.raises(ConfigError, match="train.precision='fp8'; valid choices: 'fp32', 'bf16', 'fp16'"):
        check_precision("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.precision='fp16' needs a CUDA device.*use train.precision=bf16"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("norm", NORMS)
def test_norms_keep_float32_statistics_under_bf16_autocast(norm):
    """Inputs with a large common offset (as residual streams have): statistics accumulated in bfloat16 would
    lose the per-token spread entirely; every norm matches its float32 computation on the same bf16 input."""
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=64, n_heads=2, d_ff=8, norm=norm, norm_options=quick_norm_options(norm))
    module = cfg.norm_factory()().eval()
    x = (300.0 + torch.randn(4, 16, 64) * 3).bfloat16()
    expected = module(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(x)
    scale = expected.abs().max().clamp_min(1e-3)
    # bf16 outputs near 1 round by up to 2^-8 (twice where a norm multiplies in two steps); a mean-subtracting
    # norm with bfloat16 statistics is off by 0.1 here. (For RMS-type norms bf16 statistics err by only ~0.006 on
    # this input, so for them this checks the computation as a whole, not the statistics' dtype.)
    assert ((got.float() - expected).abs().max() / scale) < 1e-2


class _Task:
    """A one-parameter task whose gradient is ``factor`` (times the loss scale)."""

    def __init__(self):
        self.factor = 1.0

    def loss(self, model, batch):
        return model.weight.sum() * self.factor

    def loss_tokens(self, batch):
        return 1


def test_gradient_scaler_skips_overflowing_steps_and_counts_them():
    """The fp16 path's scaler logic, on CPU: a step whose scaled gradient overflows is skipped (weights kept,
    scale backed off) and counted, not taken for a divergence; counts travel in the engine's state."""
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    task = _Task()
    train_cfg = {"precision": "fp32", "grad_accum": 1, "grad_clip": 0.0, "compile": False,
                 "activation_checkpointing": False}
    engine = StepEngine(model, model, optimizer, task, train_cfg, torch.device("cpu"))
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    batch = (torch.zeros(1, 1),)
    task.factor = 1e30  # 1e30 * 2^100 overflows float32
    before = model.weight.detach().clone()
    loss, grad_norm = engine.gradients(batch)
    assert engine.skips(loss, grad_norm) and engine.update()
    assert torch.equal(model.weight, before) and engine.scaler.get_scale() == 2.0**99
    task.factor = 1.0
    loss, grad_norm = engine.gradients(batch)
    assert not engine.skips(loss, grad_norm) and not engine.update()
    assert not torch.equal(model.weight, before)
    assert (engine.skipped_steps, engine.consecutive_skips) == (1, 0)
    state = json.loads(json.dumps(engine.state_dict()))  # what train_state.json holds
    twin = StepEngine(model, model, optimizer, task, train_cfg, torch.device("cpu"))
    twin.scaler = torch.amp.GradScaler("cpu")
    twin.load_state_dict(state)
    assert twin.scaler.get_scale() == 2.0**99 and twin.skipped_steps == 1
    assert MAX_CONSECUTIVE_SKIPS > 10  # a run stops only when the scale cannot find finite gradients


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    """A compile error at the first step: a warning names it and the run continues eagerly from the same
    state, ending exactly where an eager run ends."""
    common = ["train.steps=3", "model.block.dropout=0.1"]
    run(tmp_path, "eager", *common)

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("graph break: unsupported builtin")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, "fallback", *common, "train.compile=true")
    assert any("train.compile: torch.compile failed (RuntimeError: graph break" in str(w.message) for w in caught)
    assert_same_weights(weights(tmp_path, "eager"), weights(tmp_path, "fallback"), atol=0)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_reports_compile_time(tmp_path):
    common = ["train.steps=3", "model.block.attn_bias=false"]  # no key bias: see the accumulation test
    run(tmp_path, "eager", *common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: it really compiled
        run(tmp_path, "compiled", *common, "train.compile=true")
    first = [r for r in rows(tmp_path, "compiled") if "loss" in r][0]
    assert first["compile_s"] > 0
    assert_same_weights(weights(tmp_path, "eager"), weights(tmp_path, "compiled"), atol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "resi_dual"])
def test_activation_checkpointing_gives_the_same_gradients(placement):
    torch.manual_seed(0)
    cfg = tformer.BlockConfig(d_model=16, n_heads=2, d_ff=32, dropout=0.2, placement=placement)
    model = tformer.LanguageModel(cfg, 3, 50, 16).train()
    tokens = torch.randint(0, 50, (2, 12))
    grads = []
    for checkpointing in (False, True):
        from tformer.training.engine import set_activation_checkpointing

        set_activation_checkpointing(model, checkpointing)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        model(tokens).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.decoder.activation_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


def test_activation_checkpointing_in_a_recipe_matches(tmp_path):
    common = ["train.steps=2", "model.block.dropout=0.1"]
    run(tmp_path, "plain", *common)
    run(tmp_path, "ckpt", *common, "train.activation_checkpointing=true")
    assert_same_weights(weights(tmp_path, "plain"), weights(tmp_path, "ckpt"), atol=1e-6)


def test_mfu_counts_the_model_flops_per_token():
    """6 x the matmul weights (projections, feed-forward, head) + 12 x layers x d_attn x seq_len (PaLM)."""
    from tformer.training.distributed import Dist
    from tformer.training.tasks import LanguageModelTask

    config = load_config(recipe_defaults("lm"), None, [*TINY_LM, "out_dir=/nonexistent", "train.batch_size=4"])
    task = LanguageModelTask(config, Dist(), torch.device("cpu"))
    model = task.build_model()
    d, d_ff, layers, vocab, seq = 32, 64, 2, 256, 32
    matmul = layers * (3 * d * d + d * d + 2 * d * d_ff) + d * vocab  # qkv, out, ffn w1/w2, the (tied) head
    assert task.flops_per_token(model) == 6 * matmul + 12 * layers * d * seq


def test_the_100m_recipe_is_100m_parameters_of_the_documented_shape():
    from tformer.recipe_config import load_config as load

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    config = load(recipe_defaults("lm"), root / "recipes" / "configs" / "lm_100m.yaml")
    m, t = config["model"], config["train"]
    with torch.device("meta"):
        model = tformer.LanguageModel(tformer.BlockConfig(**m["block"]), m["n_layers"], config["data"]["vocab_size"],
                                      m["max_seq_len"], positions=m["positions"], tie_embeddings=m["tie_embeddings"])
    assert 95e6 < sum(p.numel() for p in model.parameters()) < 105e6
    assert (model.cfg.norm, model.cfg.placement, model.cfg.activation, model.spec.positions) == (
        "rmsnorm", "pre", "swiglu", "rope")
    assert (t["precision"], t["compile"], t["parallel"], t["activation_checkpointing"]) == ("bf16", True, "fsdp", True)
    assert t["grad_accum"] > 1


@pytest.mark.slow
def test_the_100m_recipe_runs_quick_on_this_machine(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "recipes" / "train_lm_100m.py"), "--quick", f"out_dir={tmp_path}",
                           "log.progress=false"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    model = tformer.load(tmp_path / "lm_100m_quick" / "model.safetensors")
    assert model.spec.n_layers == 12 and model.cfg.d_model == 768 and model.spec.vocab_size == 4096
    train_rows = [r for r in rows(tmp_path, "lm_100m_quick") if "loss" in r]
    assert len(train_rows) == 3 and all(math.isfinite(r["loss"]) and r["mfu"] > 0 for r in train_rows)
