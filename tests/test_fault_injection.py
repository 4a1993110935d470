"""Fault injection: ``tformer train`` killed with SIGKILL at random points, again and again, then resumed with the
same command, ends bitwise where an uninterrupted run ends, and no file a run reads is ever half-written.

The runs are forked from a "zygote" process that imported tformer once, so a kill costs a fork instead of a
Python start-up with torch (seconds) and many kills fit in the time. Each child runs ``tformer.cli.main``
exactly as the ``tformer`` command does. The kill delays come from a seeded RNG: the seed is printed, and
``TFORMER_FAULT_SEED=<seed>`` replays a run's delays (the timing of the machine still varies).

Also here: a disk that fills up or a directory that cannot be written while saving (a clear error naming
the path and the OS error, the previous checkpoint whole), a read-only run directory found before the
first step, a torn last metrics row dropped on resume, and a deterministic sweep of a crash before every
file operation of the final checkpoint's save.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

import tformer
from tformer import checkpoint
from tformer.cli import main
from tformer.recipe_config import load_config
from tformer.training import loop, recipe_defaults, train, train_state
from tformer.training.engine import StepEngine

TINY_LM = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "model.block.dropout=0.1", "data.seq_len=32", "data.eval_windows=8",
    "train.batch_size=4", "train.warmup_steps=2", "train.schedule=cosine", "log.every=1", "log.eval_every=4",
    "log.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300

_ZYGOTE = r"""
import json, os, sys, traceback
from tformer.cli import main

log = sys.argv[1]
for line in sys.stdin:
    command, argument = line.split(maxsplit=1)
    if command == "run":  # fork a child running `tformer train ARGS`, answer its pid
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(out, 1)
                os.dup2(out, 2)
                code = main(["train", *json.loads(argument)])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    elif command in ("poll", "wait"):  # the child's exit code ("running" while it runs)
        pid, status = os.waitpid(int(argument), os.WNOHANG if command == "poll" else 0)
        print("running" if pid == 0 else os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    """A process that imported tformer and forks ``tformer train`` runs on request."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(log)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=ENV)

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the zygote died; its runs said:\n{self.log_tail()}"
        return answer

    def start(self, args: list[str]) -> int:
        return int(self._ask("run " + json.dumps(args)))

    def poll(self, pid: int) -> int | None:
        answer = self._ask(f"poll {pid}")
        return None if answer == "running" else int(answer)

    def wait(self, pid: int) -> int:
        return int(self._ask(f"wait {pid}"))

    def run(self, args: list[str]) -> int:
        return self.wait(self.start(args))

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


def _rows(path: Path) -> list[dict]:
    """The whole rows of a metrics file (a torn last line, from a killed writer, left out)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:  # the piece after the last newline is torn (or empty)
        rows.append(json.loads(line))
    return rows


def _without_speed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def _latest_step(run_dir: Path) -> int:
    return json.loads((run_dir / "latest.json").read_text())["step"] if (run_dir / "latest.json").exists() else 0


def _check_run_dir(run_dir: Path) -> None:
    """Every file a run (or a user) reads parses; temporaries (dot names) are never read and may be torn."""
    if not run_dir.exists():
        return
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if any(part.startswith(".") for part in relative.parts) or path.is_dir():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
            if path.name == "model.safetensors":
                tformer.load(path)
        elif path.name == "metrics.jsonl":
            _rows(path)
        elif path.name == "config.yaml":
            assert yaml.safe_load(path.read_text())["task"] == "lm", path
        else:
            raise AssertionError(f"unexpected file {relative}")
    for directory in run_dir.glob("step_*"):
        assert sorted(p.name for p in directory.iterdir()) == [
            "model.safetensors", "train_state.json", "train_state.safetensors"], directory
    if (run_dir / "latest.json").exists():
        latest = json.loads((run_dir / "latest.json").read_text())
        state = json.loads((run_dir / latest["dir"] / "train_state.json").read_text())
        assert state["step"] == latest["step"]


def _training_rows(metrics: Path) -> set[tuple]:
    try:
        return {(r["step"], r["tokens_per_s"]) for r in _rows(metrics) if "loss" in r}
    except json.JSONDecodeError:  # a torn row in the middle: _check_run_dir reports it
        return set()


def _wait_for_training(zygote: Zygote, pid: int, metrics: Path, earlier: set[tuple], after: int) -> int | None:
    """Until the run wrote a training row past step ``after`` (one that an earlier run did not write: their
    speeds differ); the exit code if it ended first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        code = zygote.poll(pid)
        if code is not None:
            return code
        if any(step > after for step, _ in _training_rows(metrics) - earlier):
            return None
        time.sleep(0.002)
    raise AssertionError(f"the run trained no step in {TIMEOUT} s:\n{zygote.log_tail()}")


def _kill_again_and_again(tmp_path: Path, budget: float, steps: int, min_kills: int) -> None:
    seed = int(os.environ.get("TFORMER_FAULT_SEED", random.randrange(2**32)))
    print(f"fault injection seed: {seed} (TFORMER_FAULT_SEED={seed} replays its delays)")
    rng = random.Random(seed)
    args = [*TINY_LM, f"train.steps={steps}", "log.checkpoint_every=1", f"out_dir={tmp_path}"]
    zygote = Zygote(tmp_path / "runs.log")
    try:
        assert zygote.run([*args, "run=reference", f"log.checkpoint_every={steps}"]) == 0, zygote.log_tail()
        run_dir, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
        kills, in_setup, torn, deadline = 0, 0, 0, time.monotonic() + budget
        while time.monotonic() < deadline:
            start = _latest_step(run_dir)
            earlier = _training_rows(metrics)
            pid = zygote.start([*args, "run=run"])
            setup = rng.random() < 0.2
            if setup:  # during the set-up: resume, config.yaml, the metrics file's rewrite
                time.sleep(rng.uniform(0.0, 0.3))
            else:  # during the steps: metrics rows, evaluations and a checkpoint after every step
                code = _wait_for_training(zygote, pid, metrics, earlier, start)
                if code is not None:
                    assert code == 0, f"seed {seed}: the run failed (exit {code}):\n{zygote.log_tail()}"
                    break
                time.sleep(rng.uniform(0.0, 0.1))
            if zygote.poll(pid) is None:
                os.kill(pid, signal.SIGKILL)
            code = zygote.wait(pid)
            if code == 0:
                break
            assert code == -signal.SIGKILL, f"seed {seed}: the run failed (exit {code}):\n{zygote.log_tail()}"
            kills += 1
            in_setup += setup
            torn += any(p.name.startswith(".") for p in run_dir.iterdir()) if run_dir.exists() else 0
            _check_run_dir(run_dir)
        resumed_from = _latest_step(run_dir)
        if resumed_from < steps:
            assert zygote.run([*args, "run=run"]) == 0, f"seed {seed}:\n{zygote.log_tail()}"
    finally:
        zygote.close()
    print(f"{kills} kills ({in_setup} during set-up, {torn} left a half-written temporary), then resumed from "
          f"step {resumed_from} of {steps}")
    assert kills >= min_kills, f"seed {seed}: only {kills} kills in {budget} s"
    _check_run_dir(run_dir)
    if resumed_from < steps:  # the final save removed what the killed runs left behind
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    a = load_file(tmp_path / "reference" / "model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: weights differ"
    assert _without_speed(_rows(tmp_path / "reference" / "metrics.jsonl")) == _without_speed(_rows(metrics)), \
        f"seed {seed}: metrics differ"


def test_sigkill_at_random_points_then_the_same_command_ends_bitwise_as_an_uninterrupted_run(tmp_path):
    _kill_again_and_again(tmp_path, budget=10.0, steps=150, min_kills=2)  # 3-4 idle, 3 with both cores busy


@pytest.mark.slow
def test_sigkill_many_times(tmp_path):
    # about 20 kills on an idle 2-core machine, 19 on a slower day: the floor only guards against a loop that
    # stopped killing (a run that trained through the budget), not against the machine's speed
    _kill_again_and_again(tmp_path, budget=45.0, steps=300, min_kills=10)


# --- a crash before each file operation of a save, deterministically -------------------------------------

class _Crash(BaseException):
    """A process dying here (BaseException: nothing catches it on its way out)."""


def _config(tmp_path, *extra):
    return load_config(recipe_defaults("lm"), None, [*TINY_LM, f"out_dir={tmp_path}", *extra])


def test_a_crash_before_any_file_operation_of_the_last_save_leaves_a_run_that_resumes_to_the_same_end(
        tmp_path, monkeypatch):
    """The final checkpoint's save is where a crash can hurt most: the same command then has no step left to
    train and must still end with the final model (model.safetensors before latest.json). A crash before each
    rename, copy, removal and directory creation of that save in turn."""
    common = ["train.steps=6", "log.checkpoint_every=2", "log.keep_checkpoints=2"]
    train(_config(tmp_path, *common, "run=reference"))
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    operations = {"os.replace": (os, "replace"), "shutil.copyfile": (shutil, "copyfile"),
                  "shutil.rmtree": (shutil, "rmtree"), "Path.mkdir": (Path, "mkdir")}
    crashed = []
    for name, (owner, attribute) in operations.items():
        for index in range(12):
            run = f"{attribute}{index}"
            original = getattr(owner, attribute)
            calls = {"n": 0, "armed": False}
            save = loop.save_training_state

            def arming(run_dir, step, *args, _save=save, _calls=calls, **kwargs):
                _calls["armed"] = step == 6
                return _save(run_dir, step, *args, **kwargs)

            def crashing(*args, _original=original, _calls=calls, _index=index, **kwargs):
                if _calls["armed"]:
                    if _calls["n"] == _index:
                        raise _Crash
                    _calls["n"] += 1
                return _original(*args, **kwargs)

            with monkeypatch.context() as patch:
                patch.setattr(loop, "save_training_state", arming)
                patch.setattr(owner, attribute, crashing)
                try:
                    train(_config(tmp_path, *common, f"run={run}"))
                except _Crash:
                    crashed.append(run)
                else:
                    break  # fewer than `index` such operations in the save
            _check_run_dir(tmp_path / run)
            train(_config(tmp_path, *common, f"run={run}"))
            got = load_file(tmp_path / run / "model.safetensors")
            assert all(torch.equal(expected[k], got[k]) for k in expected), f"crash before {name} #{index}"
            assert _latest_step(tmp_path / run) == 6
    assert len(crashed) >= 10, crashed


# --- torn metrics --------------------------------------------------------------------------------------

def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path):
    config = _config(tmp_path, "train.steps=4", "log.checkpoint_every=2")
    train(config, stop_at=3)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 2.7')  # a writer killed in the middle of a row
    assert train(config).steps == 4
    rows = _rows(metrics)
    assert metrics.read_text().endswith("\n")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# --- disk full, read-only ---------------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _no_space_for_text(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


def _save_fails(monkeypatch, at_step: int, how: str) -> None:
    """From the save of ``at_step`` on, the disk is full: safetensors' own write fails as it does then (a
    SafetensorError naming os error 28), or the JSON state's write raises OSError(ENOSPC)."""
    save = loop.save_training_state

    def filling(run_dir, step, *args, **kwargs):
        if step >= at_step:
            if how == "safetensors":
                monkeypatch.setattr(checkpoint, "save_file", _no_space)
                monkeypatch.setattr(train_state, "save_file", _no_space)
            else:
                monkeypatch.setattr(Path, "write_text", _no_space_for_text)
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_training_state", filling)


@pytest.mark.parametrize("how", ["safetensors", "json"])
def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_stays_whole(tmp_path, monkeypatch,
                                                                                         capsys, how):
    _save_fails(monkeypatch, at_step=4, how=how)
    code = main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=6", "log.checkpoint_every=2"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert code == 2 and "Traceback" not in err
    assert f"cannot write checkpoint step 4 to {run}: No space left on device" in err, err
    assert "the newest complete checkpoint (step 2) is whole" in err
    assert json.loads((run / "latest.json").read_text())["step"] == 2
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the partial checkpoint's space is back
    tformer.load(run / "step_0000002" / "model.safetensors")
    _check_run_dir(run)
    assert main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=6", "log.checkpoint_every=2"]) == 0
    assert _latest_step(run) == 6


def test_disk_full_while_writing_metrics_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from tformer.training import run_logs

    real_open = open

    def filling(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_logs, "open", filling, raising=False)
    assert main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device" in err
    assert "Traceback" not in err


@contextmanager
def _read_only(directory: Path, monkeypatch):
    """``directory`` read-only: chmod 555, or, as root (whom permissions do not stop), every call that would
    create, rename or remove something inside it fails with EROFS as on a read-only mount."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(directory.resolve())
        except (TypeError, ValueError):
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guard(original, *which):
        def guarded(*args, **kwargs):
            for i in which:
                if i < len(args) and inside(args[i]):
                    refuse(args[i])
            return original(*args, **kwargs)
        return guarded

    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", guarded_open)
        for name, which in (("mkdir", (0,)), ("replace", (0, 1)), ("rename", (0, 1)), ("unlink", (0,)),
                            ("rmdir", (0,))):
            patch.setattr(os, name, guard(getattr(os, name), *which))
        patch.setattr(shutil, "copyfile", guard(shutil.copyfile, 1))
        patch.setattr(checkpoint, "save_file", guard(checkpoint.save_file, 1))
        patch.setattr(train_state, "save_file", guard(train_state.save_file, 1))
        yield


def test_a_read_only_run_directory_fails_before_the_first_step(tmp_path, monkeypatch, capsys):
    args = ["train", *TINY_LM, f"out_dir={tmp_path}", "log.checkpoint_every=2"]
    assert main([*args, "train.steps=4"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    steps = {"n": 0}
    gradients = StepEngine.gradients

    def counted(self, batch):
        steps["n"] += 1
        return gradients(self, batch)

    monkeypatch.setattr(StepEngine, "gradients", counted)
    with _read_only(run, monkeypatch):
        code = main([*args, "train.steps=40"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"cannot write to the run directory {run}: " in err
    assert "Read-only file system" in err or "Permission denied" in err
    assert steps["n"] == 0  # refused before training a step, not at the first checkpoint
    assert (run / "metrics.jsonl").read_text() == before
    assert _latest_step(run) == 4
    tformer.load(run / "model.safetensors")


def test_a_run_directory_that_turns_read_only_while_training_is_a_clear_error(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    save = loop.save_training_state
    state = {}

    def turning_read_only(run_dir, step, *args, **kwargs):
        if step == 4 and "guard" not in state:  # someone remounts the disk read-only after step 2's save
            state["guard"] = _read_only(run, monkeypatch)
            state["guard"].__enter__()
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_training_state", turning_read_only)
    try:
        code = main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=6", "log.checkpoint_every=2"])
    finally:
        if "guard" in state:
            state["guard"].__exit__(None, None, None)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"cannot write checkpoint step 4 to {run}: " in err
    assert "Read-only file system" in err or "Permission denied" in err
    assert "the newest complete checkpoint (step 2) is whole" in err
    assert _latest_step(run) == 2
    tformer.load(run / "step_0000002" / "model.safetensors")
    _check_run_dir(run)
