"""The stability atlas: cells, classification, the cache (resume, reuse), parallel jobs, outputs, the command."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from tformer import ConfigError
from tformer.atlas import (
    STUCK_MARGIN, AtlasGrid, AtlasInterrupted, CellCache, CellSpec, classify, make_grid, run_atlas, run_cell,
    run_cells, stable_lr_table, unigram_entropy,
)
from tformer.cli import main
from tformer.data import corpus_splits

from conftest import default_signals

TINY = dict(steps=3, d_model=16, n_heads=2, d_ff=32, seq_len=16, batch_size=4, eval_windows=4)


def tiny(**changes) -> CellSpec:
    return replace(CellSpec("layernorm", "pre", 1, 1e-3, 0, **TINY), **changes)


def test_classification_rules():
    assert classify(7, math.nan, 3.2) == "diverged"
    assert classify(None, math.inf, 3.2) == "diverged"  # finite training, non-finite validation
    assert classify(None, 3.2 - STUCK_MARGIN + 0.01, 3.2) == "stuck"
    assert classify(None, 3.6, 3.2) == "stuck"  # blew up to a finite loss: no better than byte frequencies
    assert classify(None, 3.2 - STUCK_MARGIN - 0.01, 3.2) == "trains"


def test_unigram_entropy_matches_an_independent_count():
    tokens, _ = corpus_splits()
    counts = {}
    for t in tokens.tolist():
        counts[t] = counts.get(t, 0) + 1
    n = len(tokens)
    assert unigram_entropy(tokens) == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()), rel=1e-9)


def test_a_cell_trains_and_is_deterministic():
    spec = tiny(d_model=32, n_heads=4, d_ff=64, steps=60, lr=1e-2, seq_len=32, batch_size=8, eval_windows=16)
    row = run_cell(spec)
    assert row["status"] == "trains", row
    assert row["final_val_loss"] < row["unigram_entropy"] - STUCK_MARGIN < row["first_loss"]
    assert row["final_bits_per_byte"] == pytest.approx(row["final_val_loss"] / math.log(2))
    assert row["curve"][0][0] == 1 and row["curve"][-1][0] == 60
    assert run_cell(spec)["final_val_loss"] == row["final_val_loss"]  # depends on the spec alone
    assert run_cell(replace(spec, seed=1))["final_val_loss"] != row["final_val_loss"]


def test_the_key_covers_every_field_and_only_the_fields():
    spec = tiny()
    assert spec.key() == tiny().key()
    assert len({replace(spec, **{f: v}).key() for f, v in [("norm", "rmsnorm"), ("placement", "post"), ("depth", 2),
                ("lr", 2e-3), ("warmup_steps", 1), ("seed", 1), ("steps", 4), ("d_model", 32)]} | {spec.key()}) == 9


class Counting:
    """A runner that records the cells it runs and can raise Ctrl-C at the n-th one."""

    def __init__(self, interrupt_at=None):
        self.ran, self.interrupt_at = [], interrupt_at

    def __call__(self, spec):
        if self.interrupt_at is not None and len(self.ran) == self.interrupt_at:
            raise KeyboardInterrupt
        self.ran.append(spec)
        return {**spec.__dict__, "status": "trains", "final_val_loss": 2.0 + spec.lr, "version": 1, "seconds": 0.0,
                "unigram_entropy": 3.2, "curve": []}


def test_cache_resumes_after_an_interrupt_without_redoing_cells(tmp_path):
    specs = [tiny(lr=lr) for lr in (1e-3, 2e-3, 3e-3, 4e-3, 5e-3)]
    first = Counting(interrupt_at=3)
    with pytest.raises(AtlasInterrupted, match="3 of 5 cells are cached.*run the same command to resume"):
        run_cells(specs, tmp_path, runner=first, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 3
    second = Counting()
    rows = run_cells(specs, tmp_path, runner=second, progress=False)
    assert set(second.ran) == set(specs) - set(first.ran) and len(second.ran) == 2
    assert [r["lr"] for r in rows] == [s.lr for s in specs]  # in the order asked
    third = Counting()
    run_cells(specs, tmp_path, runner=third, progress=False)
    assert third.ran == []


def test_a_larger_grid_reuses_the_smaller_ones_cells(tmp_path):
    small = AtlasGrid(["layernorm"], ["pre"], [1], [1e-3], [0], [0], cell=TINY)
    large = AtlasGrid(["layernorm", "rmsnorm"], ["pre", "post"], [1], [1e-3, 3e-3], [0], [0], cell=TINY)
    run_cells(small.cells(), tmp_path, runner=Counting(), progress=False)
    runner = Counting()
    run_cells(large.cells(), tmp_path, runner=runner, progress=False)
    assert len(runner.ran) == len(large.cells()) - 1 and small.cells()[0] not in runner.ran


def test_a_foreign_or_stale_cache_file_is_recomputed(tmp_path):
    spec = tiny()
    cache = CellCache(tmp_path)
    cache.path(spec).parent.mkdir(parents=True, exist_ok=True)
    cache.path(spec).write_text("{not json")
    assert cache.get(spec) is None
    cache.path(spec).write_text(json.dumps({"version": 0, "status": "trains"}))
    assert cache.get(spec) is None


def test_parallel_jobs_give_the_same_cells_as_one_process(tmp_path):
    specs = [tiny(lr=lr) for lr in (1e-3, 1e-2)]
    serial = run_cells(specs, tmp_path / "a", progress=False)
    parallel = run_cells(specs, tmp_path / "b", jobs=2, progress=False)
    for a, b in zip(serial, parallel):
        assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], abs=1e-5)
        assert a["status"] == b["status"]


def _rows(statuses: dict) -> list[dict]:
    """Rows for one norm x placement x depth x warmup: {lr: [status per seed]}."""
    return [{"norm": "layernorm", "placement": "post", "depth": 6, "warmup_steps": 0, "lr": lr, "seed": seed, "status": s,
             "final_val_loss": math.nan if s == "diverged" else 2.5 + lr} for lr, per_seed in statuses.items()
            for seed, s in enumerate(per_seed)]


def test_largest_stable_learning_rate():
    [row] = stable_lr_table(_rows({1e-3: ["trains", "trains"], 1e-2: ["trains", "trains"],
                                   3e-2: ["trains", "diverged"], 1e-1: ["diverged", "diverged"]}))
    assert row["largest_stable_lr"] == 1e-2 and row["monotone"] and row["best_lr"] == 1e-3
    [row] = stable_lr_table(_rows({1e-3: ["stuck", "stuck"], 1e-2: ["trains", "trains"]}))
    assert row["largest_stable_lr"] == 1e-2 and not row["monotone"]
    [row] = stable_lr_table(_rows({1e-3: ["stuck", "trains"], 1e-2: ["diverged", "diverged"]}))
    assert row["largest_stable_lr"] is None and math.isnan(row["best_val_loss"])


def test_run_atlas_writes_every_output(tmp_path):
    grid = AtlasGrid(["layernorm", "rmsnorm"], ["pre", "post"], [1, 2], [1e-3, 1e-2], [0, 1], [0, 1], cell=TINY)
    rows = run_atlas(tmp_path, grid, progress=False)
    assert len(rows) == 64
    cells = json.loads((tmp_path / "cells.json").read_text())
    assert len(cells["cells"]) == 64 and cells["grid"]["cell"]["steps"] == 3 and "curve" not in cells["cells"][0]
    with open(tmp_path / "cells.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 64
    assert set(table[0]) >= {"norm", "placement", "depth", "lr", "warmup_steps", "seed", "status", "final_val_loss"}
    assert {r["status"] for r in table} <= {"trains", "stuck", "diverged"}
    assert len((tmp_path / "stable_lr.csv").read_text().splitlines()) == 1 + 2 * 2 * 2 * 2
    for depth in (1, 2):
        assert (tmp_path / f"heatmap_depth{depth}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert "| norm | placement | L1 no warmup | L1 warmup 1 | L2 no warmup | L2 warmup 1 |" in summary
    assert "| rmsnorm | post |" in summary and "![heatmap_depth2.png](heatmap_depth2.png)" in summary


def test_the_quick_grid_covers_what_the_api_promises():
    """API.md: at each of at least 2 depths and 3 peak learning rates, layernorm with pre and with post, no warmup."""
    quick = make_grid("quick")
    assert len(quick.depths) >= 2 and len(quick.lrs) >= 3
    cells = {(c.norm, c.placement, c.depth, c.lr, c.warmup_steps) for c in quick.cells()}
    assert all(("layernorm", p, d, lr, 0) in cells for p in ("pre", "post") for d in quick.depths for lr in quick.lrs)


def test_grid_presets_and_validation():
    from tformer import NORMS, PLACEMENTS

    default = make_grid()
    assert list(default.norms) == list(NORMS) and len(default.seeds) >= 2
    quick = make_grid("quick")
    assert set(quick.cells()) <= set(default.cells())  # a later default run reuses --quick's cells
    assert list(make_grid("quick", placements=["all"]).placements) == list(PLACEMENTS)
    for axes, message in [(dict(norms=["layrnorm"]), "unknown norm 'layrnorm'; valid: layernorm"),
                          (dict(placements=["middle"]), "unknown placement 'middle'"),
                          (dict(lrs=[0.0]), "learning rates must be in"),
                          (dict(depths=[0]), "depths must be"),
                          (dict(warmups=[500]), "shorter than the 120 steps"),
                          (dict(cell={"steps": 0}), "steps per cell"),
                          (dict(cell={"device": "tpu"}), "device must be cpu or cuda")]:
        with pytest.raises(ConfigError, match=message):
            make_grid("quick", **axes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_cells_are_refused_without_a_gpu():
    with pytest.raises(ConfigError, match="no CUDA device; use --device cpu"):
        make_grid("quick", cell={"device": "cuda"})


@pytest.mark.cuda
def test_a_cell_on_the_gpu_matches_the_cpu():
    spec = tiny(d_model=32, n_heads=4, d_ff=64, steps=20, lr=1e-2)
    cpu, gpu = run_cell(spec), run_cell(replace(spec, device="cuda"))
    assert gpu["final_val_loss"] == pytest.approx(cpu["final_val_loss"], abs=1e-3)
    assert replace(spec, device="cuda").key() != spec.key()


def test_atlas_command(tmp_path, capsys):
    args = ["atlas", "--out", str(tmp_path), "--norms", "rmsnorm", "--placements", "pre", "--depths", "1",
            "--lrs", "1e-3", "--warmups", "0", "--seeds", "0", "--steps", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "# Stability atlas" in out.out and "1 cells" in out.err
    assert main(["atlas", "--norms", "layrnorm"]) == 2
    assert "valid: layernorm" in capsys.readouterr().err
    assert main(["atlas", "--jobs", "0"]) == 2


@pytest.mark.slow
def test_ctrl_c_then_resume_through_the_command(tmp_path):
    """SIGINT mid-atlas: exit 130 naming the cached cells; the rerun keeps those files and does the rest."""
    out = tmp_path / "atlas"
    args = [sys.executable, "-m", "tformer", "atlas", "--out", str(out), "--norms", "layernorm", "--placements",
            "pre", "post", "--depths", "2", "--lrs", "1e-3", "1e-2", "--warmups", "0", "--seeds", "0", "1",
            "--steps", "40", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_signals)
    deadline = time.time() + 120
    while len(list((out / "cells").glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "cells are cached" in err and "run the same command to resume" in err
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 2 <= len(before) < 8
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(after) == 8 and all(after[name] == mtime for name, mtime in before.items())


@pytest.mark.slow
def test_quick_atlas_end_to_end(tmp_path):
    """The --quick atlas in two processes: Pre-LN trains at 3e-3 and 1e-2 at both depths, Post-LN at 1e-2 without
    warmup does not (Xiong et al.), and the CSV, figures and table are written."""
    assert main(["atlas", "--quick", "--jobs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    with open(tmp_path / "cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == len(make_grid("quick").cells())
    rows = {(r["norm"], r["placement"], int(r["depth"]), float(r["lr"]), int(r["warmup_steps"])): r for r in cells}
    for depth in (6, 12):
        assert all(rows[("layernorm", "pre", depth, lr, w)]["status"] == "trains" for lr in (3e-3, 1e-2) for w in (0, 30))
        assert rows[("layernorm", "post", depth, 1e-2, 0)]["status"] != "trains"
        assert (tmp_path / f"heatmap_depth{depth}.png").stat().st_size > 10_000
