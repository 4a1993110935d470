"""Two processes with gloo on this machine: DDP and FSDP2 (`train.parallel`), gradient accumulation across
processes, sharded checkpoints resumed on another number of processes, and the monitor's gradient norms."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tformer

ROOT = Path(__file__).resolve().parents[1]
# attn_bias=false: the key bias has an exactly-zero true gradient, so its rounding noise (which differs between
# one and two processes) would be turned into lr-sized Adam steps; every other parameter is compared.
TINY = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "model.block.attn_bias=false", "data.seq_len=32", "data.eval_windows=8",
    "train.warmup_steps=2", "log.every=1", "log.eval_every=100", "log.progress=false", "log.monitor=true",
    "log.monitor_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, run: str, *overrides, processes: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [str(ROOT / "recipes" / "train_lm.py"), *TINY, f"out_dir={tmp_path}", f"run={run}", *overrides]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", *script]
    else:
        command = [sys.executable, *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def rows(tmp_path, run, name="metrics.jsonl"):
    return [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]


def losses(tmp_path, run):
    return [r["loss"] for r in rows(tmp_path, run) if "loss" in r]


def grad_norms(tmp_path, run):
    return [(r["step"], r["stack"], r["layer"], r["param"], r["value"])
            for r in rows(tmp_path, run, "monitor.jsonl") if r["metric"] == "grad_norm"]


def assert_monitors_agree(tmp_path, a, b):
    ga, gb = grad_norms(tmp_path, a), grad_norms(tmp_path, b)
    assert len(ga) == len(gb) > 0  # rank 0 alone writes: no duplicated rows
    for x, y in zip(ga, gb):
        assert x[:4] == y[:4]
        assert y[4] == pytest.approx(x[4], rel=1e-5, abs=1e-9), x[:4]


def weights(tmp_path, run):
    return tformer.load(tmp_path / run / "model.safetensors").state_dict()


def test_ddp_with_accumulation_matches_one_process_and_the_monitor_agrees(tmp_path):
    """2 processes x batch 4 x grad_accum 2 (no all-reduce on the inner micro-batch) = 1 process x batch 8."""
    launch(tmp_path, "single", "train.steps=4", "train.batch_size=8")
    launch(tmp_path, "ddp", "train.steps=4", "train.batch_size=4", "train.grad_accum=2", processes=2)
    assert losses(tmp_path, "ddp") == pytest.approx(losses(tmp_path, "single"), rel=1e-5)
    assert_monitors_agree(tmp_path, "single", "ddp")


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_on_another_number_of_processes(tmp_path):
    """FSDP2 over 2 processes (every block sharded; 2 micro-batches per step, reduce-scattered only on the last;
    the checkpoint written by both ranks through torch.distributed.checkpoint) for 2 steps, resumed by 1
    process for 2 more: the losses, the monitor's per-layer gradient norms (gathered from the shards) and the
    final weights are those of a one-process run with the same 8 sequences per step."""
    common = ["train.parallel=fsdp", "log.checkpoint_every=2"]
    launch(tmp_path, "single", *common, "train.batch_size=8", "train.steps=4")
    common += ["train.batch_size=4", "train.grad_accum=2"]
    launch(tmp_path, "fsdp", *common, "train.steps=2", processes=2)
    step_dir = tmp_path / "fsdp" / "step_0000002"
    assert (step_dir / "dcp" / ".metadata").is_file() and len(list((step_dir / "dcp").glob("*.distcp"))) == 2
    consolidated = tformer.load(step_dir / "model.safetensors")  # the gathered model, read in one process
    assert isinstance(consolidated, tformer.LanguageModel)
    launch(tmp_path, "fsdp", *common, "train.steps=4")  # one process, from the 2-process shards
    assert losses(tmp_path, "fsdp") == pytest.approx(losses(tmp_path, "single"), rel=1e-5)
    assert_monitors_agree(tmp_path, "single", "fsdp")
    a, b = weights(tmp_path, "single"), weights(tmp_path, "fsdp")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp_run_interrupted_resumes_where_it_left_off(tmp_path):
    """2 processes stopped after their step-2 checkpoint and restarted: the same weights as 4 straight steps
    (bitwise: the same processes, shards and reduction order; dropout and activation checkpointing included)."""
    common = ["train.batch_size=8", "train.parallel=fsdp", "log.checkpoint_every=2", "model.block.dropout=0.1",
              "train.activation_checkpointing=true"]
    launch(tmp_path, "straight", *common, "train.steps=4", processes=2)
    launch(tmp_path, "resumed", *common, "train.steps=2", processes=2)
    launch(tmp_path, "resumed", *common, "train.steps=4", processes=2)
    a, b = weights(tmp_path, "straight"), weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path, "resumed") == losses(tmp_path, "straight")


def test_parallel_options_are_validated(tmp_path):
    from tformer import ConfigError
    from tformer.recipe_config import load_config
    from tformer.training import recipe_defaults, train

    def run(*overrides):
        train(load_config(recipe_defaults("lm"), None, [*TINY, f"out_dir={tmp_path}", "train.steps=1", *overrides]))

    with pytest.raises(ConfigError, match="train.parallel='zero'; valid choices: 'ddp', 'fsdp'"):
        run("train.parallel=zero")
    with pytest.raises(ConfigError, match="train.cpu_offload=true .* needs train.parallel=fsdp on CUDA"):
        run("train.parallel=fsdp", "train.cpu_offload=true")


@pytest.mark.slow
def test_fsdp_bf16_uses_fsdps_precision_policy_and_tracks_autocast(tmp_path):
    """FSDP with train.precision=bf16 gathers parameters in bf16 (MixedPrecisionPolicy, float32 reduction)
    instead of autocasting: a different rounding scheme, so the losses agree with a one-process bf16-autocast
    run to bf16 precision rather than exactly."""
    common = ["train.batch_size=8", "train.precision=bf16", "train.parallel=fsdp", "train.steps=4"]
    launch(tmp_path, "autocast", *common)
    launch(tmp_path, "policy", *common, processes=2)
    assert losses(tmp_path, "policy") == pytest.approx(losses(tmp_path, "autocast"), rel=2e-3)
    assert losses(tmp_path, "policy") != losses(tmp_path, "autocast")  # really another scheme


def test_a_crafted_sharded_checkpoint_is_refused_not_executed(tmp_path):
    """torch.distributed.checkpoint writes its metadata with pickle; tformer unpickles it with an allowlist of
    DCP's own metadata classes, so a .metadata that would run a command is a CheckpointError instead."""
    import pickle

    from tformer import CheckpointError
    from tformer.recipe_config import load_config
    from tformer.training import recipe_defaults, train

    overrides = [*TINY, f"out_dir={tmp_path}", "train.parallel=fsdp", "log.checkpoint_every=2", "log.monitor=false"]
    train(load_config(recipe_defaults("lm"), None, [*overrides, "train.steps=2"]))  # one process, DCP format
    metadata = tmp_path / "run" / "step_0000002" / "dcp" / ".metadata"
    assert metadata.is_file()
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    metadata.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"metadata names (posix|os)\.system.*refusing to unpickle"):
        train(load_config(recipe_defaults("lm"), None, [*overrides, "train.steps=4"]))
    assert not marker.exists()
