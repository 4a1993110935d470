"""SIGINT and SIGTERM stop ``tformer train`` after a finished step with that step's checkpoint, and the same
command resumes from it bitwise; a second signal during the save tears nothing; ``train`` restores the
handlers it replaced; several processes stop after the same step.

The signals go to real ``python -m tformer train`` processes (an in-process test would be killed with
pytest where the handlers are missing), except where the test installs its own handler first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tformer
from tformer.cli import main
from tformer.recipe_config import load_config
from tformer.training import recipe_defaults, train
from tformer.training.loop import TrainingInterrupted
from tformer.training.run_logs import MetricsLog

from conftest import default_signals

TINY_LM = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "model.block.dropout=0.1", "data.seq_len=32", "data.eval_windows=8",
    "train.batch_size=4", "train.warmup_steps=2", "train.schedule=cosine", "log.every=1", "log.eval_every=4",
    "log.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 240


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tformer", "train", *TINY_LM, *args]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being appended right now
            break
    return rows


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in _rows(run_dir) if "loss" in r), default=0)


def _signal_after(proc: subprocess.Popen, run_dir: Path, step: int, number: int) -> None:
    """Send ``number`` to ``proc`` once its metrics show a training row at ``step`` or later."""
    deadline = time.monotonic() + TIMEOUT
    while _last_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no metrics row for step {step} in {TIMEOUT} s"
        time.sleep(0.01)
    proc.send_signal(number)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def _without_speed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def _assert_stopped_at_a_whole_checkpoint(run_dir: Path, code: int, err: str, name: str, total: int) -> int:
    """The exit code and message of a stop by ``name``; returns the step, checked against the metrics, the
    checkpoint latest.json names and its files."""
    step = _last_step(run_dir)
    assert code == {"SIGINT": 130, "SIGTERM": 143}[name], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"{name} received: finishing the current step, then saving a checkpoint" in err
    assert f"{name} received: stopped after step {step} of {total}" in err, err[-3000:]
    assert f"run the same command to resume from step {step}" in err
    assert json.loads((run_dir / "latest.json").read_text()) == {"step": step, "dir": f"step_{step:07d}"}
    checkpoint = run_dir / f"step_{step:07d}"
    assert str(checkpoint) in err
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == step
    load_file(checkpoint / "train_state.safetensors")
    saved = tformer.load(checkpoint / "model.safetensors").state_dict()
    newest = tformer.load(run_dir / "model.safetensors").state_dict()
    assert all(torch.equal(saved[k], newest[k]) for k in saved)
    return step


def test_sigint_then_sigterm_stop_with_a_checkpoint_and_the_run_resumes_bitwise(tmp_path):
    """SIGINT before the first scheduled checkpoint (step 50), SIGTERM after it: each stops after a whole
    step with that step's checkpoint, says so, exits 130 / 143, and the resumed run ends on the same weights
    and metrics as an uninterrupted one."""
    steps, args = 120, ["train.steps=120", "log.checkpoint_every=50", f"out_dir={tmp_path}"]
    reference = subprocess.Popen(_command(*args, "run=reference"), env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    run_dir = tmp_path / "run"
    session = _command(*args, "run=run")
    sessions = []
    for number, at in ((signal.SIGINT, 3), (signal.SIGTERM, 55)):
        proc = subprocess.Popen(session, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_signals)
        _signal_after(proc, run_dir, at, number)
        code, err = _finish(proc)
        sessions.append(_assert_stopped_at_a_whole_checkpoint(run_dir, code, err, number.name, steps))
    assert 3 <= sessions[0] < 50 and 55 <= sessions[1] < steps, sessions  # before and after step 50's checkpoint
    done = subprocess.run(session, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    code, err = _finish(reference)
    assert code == 0, err[-3000:]
    a = load_file(tmp_path / "reference" / "model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_speed(_rows(tmp_path / "reference")) == _without_speed(_rows(run_dir))


_SIGNALS_DURING_THE_SAVE = """
import os, signal, sys
from tformer import checkpoint
from tformer.cli import main
from tformer.training import run_logs

write = run_logs.MetricsLog.write
def write_then_stop(self, row):  # Ctrl-C as step 6's metrics row is written
    write(self, row)
    if row.get("step") == 6 and "loss" in row:
        os.kill(os.getpid(), signal.SIGINT)
run_logs.MetricsLog.write = write_then_stop

atomic_write = checkpoint.atomic_write
def impatient(path, fn):  # Ctrl-C and SIGTERM again after the first file of the interruption's checkpoint
    result = atomic_write(path, fn)
    if str(path).endswith(".step_0000006.tmp/model.safetensors"):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    return result
checkpoint.atomic_write = impatient
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_signals_during_the_interruption_checkpoint_are_ignored_and_it_is_whole(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_LM, "train.steps=40", "log.checkpoint_every=4", f"out_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", _SIGNALS_DURING_THE_SAVE, *args], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False, preexec_fn=default_signals)
    assert proc.stderr.count("received again: still finishing the step and its checkpoint; ignored") == 2
    assert _assert_stopped_at_a_whole_checkpoint(run_dir, proc.returncode, proc.stderr, "SIGINT", 40) == 6
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "latest.json", "metrics.jsonl",
                                                         "model.safetensors", "step_0000004", "step_0000006"]


@pytest.fixture
def own_handlers():
    """A handler of the test's own for SIGINT and SIGTERM (so a signal that train() did not catch lands here,
    not in pytest); yields the signals it received, puts the previous handlers back."""
    received = []

    def handler(number, frame):
        received.append(number)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    yield handler, received
    for number, old in previous.items():
        signal.signal(number, old)


def _config(tmp_path, *extra):
    return load_config(recipe_defaults("lm"), None, [*TINY_LM, f"out_dir={tmp_path}", *extra])


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_as_a_library_call_raises_training_interrupted_and_restores_handlers(tmp_path, monkeypatch,
                                                                                   own_handlers, number):
    handler, received = own_handlers
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row.get("step") == 3 and "loss" in row:
            assert signal.getsignal(number) is not handler  # train's own while the steps run
            os.kill(os.getpid(), number)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        train(_config(tmp_path, "train.steps=10", "log.checkpoint_every=100"))
    assert received == []
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt) and not isinstance(stop, Exception)
    assert (stop.signum, stop.step, stop.exit_code) == (number, 3, 128 + number)
    assert stop.checkpoint == tmp_path / "run" / "step_0000003" and stop.checkpoint.is_dir()
    assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler
    # resume=false: the message says how to resume instead of promising that the same command does
    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    with pytest.raises(TrainingInterrupted, match=r"with resume=true to resume from step 3 \(with resume=false"):
        train(_config(tmp_path, "train.steps=10", "log.checkpoint_every=100", "resume=false", "run=again"))


def test_handlers_are_restored_after_a_normal_run_and_left_alone_outside_the_main_thread(tmp_path, own_handlers):
    handler, _ = own_handlers
    seen = []
    result = train(_config(tmp_path, "train.steps=3"))
    assert result.steps == 3
    assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler

    def in_a_thread():
        seen.append(train(_config(tmp_path, "train.steps=3", "run=thread")).steps)
        seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join(timeout=TIMEOUT)
    assert seen == [3, handler]


def test_ctrl_c_outside_the_steps_says_truthfully_what_the_same_command_does(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tformer.training.loop.train", interrupted)
    args = ["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=3"]
    assert main(args) == 130
    assert f"{tmp_path / 'run'} holds no checkpoint yet: the same command starts over" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.json").write_text(json.dumps({"step": 7, "dir": "step_0000007"}))
    assert main(args) == 130
    assert "run the same command to resume from step 7" in capsys.readouterr().err
    assert main([*args, "resume=false"]) == 130
    assert "the same command starts over (resume=false)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """Two ranks as torchrun starts them (RANK, WORLD_SIZE, ...; without torchrun's agent, which would forward
    a signal to every rank): SIGINT reaches rank 1 alone; both stop after the same step, rank 0 writes that
    step's checkpoint and says so, and both exit 130."""
    run_dir = tmp_path / "run"
    args = ["train.steps=400", "train.batch_size=8", "log.eval_every=1000", "log.checkpoint_every=1000",
            f"out_dir={tmp_path}", "run=run"]
    port = str(_free_port())

    def start(rank: int, *extra: str) -> subprocess.Popen:
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        return subprocess.Popen(_command(*args, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=default_signals)

    ranks = [start(0), start(1)]
    _signal_after(ranks[1], run_dir, 3, signal.SIGINT)
    (code0, err0), (code1, err1) = _finish(ranks[0]), _finish(ranks[1])
    assert code1 == 130, err1[-3000:]
    assert "Traceback" not in err0 + err1 and "received" not in err1  # rank 0 alone speaks
    step = _last_step(run_dir)
    assert f"SIGINT received: stopped after step {step} of 400" in err0
    assert code0 == 130, err0[-3000:]
    assert 3 <= step < 400
    assert json.loads((run_dir / "latest.json").read_text())["step"] == step
    assert [r["step"] for r in _rows(run_dir) if "loss" in r] == list(range(1, step + 1))
