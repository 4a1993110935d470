import csv

import math

import pytest

from tformer import NORMS, PLACEMENTS
from tformer.cli import main
from tformer.study import StudyRow, run_study, unigram_entropy, verdict

TINY = ["model.n_layers=1", "model.block.d_model=16", "model.block.n_heads=2", "model.block.d_ff=32",
        "data.seq_len=16", "model.max_seq_len=16", "data.eval_windows=4", "train.batch_size=4", "log.eval_every=5"]


def test_study_writes_table_verdict_and_plot(tmp_path):
    rows, summary = run_study(tmp_path, placements=("pre", "post"), norms=("rmsnorm",), warmup_steps=3, steps=10,
                              target_loss=5.0, overrides=TINY, progress=False)
    assert [(r.placement, r.norm, r.warmup_steps) for r in rows] == [
        ("pre", "rmsnorm", 0), ("pre", "rmsnorm", 3), ("post", "rmsnorm", 0), ("post", "rmsnorm", 3)]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and set(table[0]) >= {"final_val_loss", "status", "steps_to_target"}
    markdown = (tmp_path / "results.md").read_text()
    assert "## Verdict" in markdown and "| pre | rmsnorm | 0 |" in markdown
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["unigram_entropy"] == pytest.approx(unigram_entropy())
    assert all(r.steps_to_target in (5, 10) for r in rows)  # a target of 5 nats/byte is reached at once


def test_unigram_entropy_is_below_uniform():
    assert 2.5 < unigram_entropy() < 5.545  # ln(256) = 5.545


def _row(placement, warmup, loss, status="trained"):
    return StudyRow(placement, "layernorm", warmup, loss, loss, status, None, 1.0)


def test_verdict_rules():
    rows = [_row("pre", 0, 2.42), _row("pre", 100, 2.40),
            _row("post", 0, 3.15, "stuck (near unigram entropy)"), _row("post", 100, 2.45),
            _row("sandwich", 0, 2.70), _row("sandwich", 100, 2.45),
            _row("deepnorm", 0, float("nan"), "diverged at step 7"), _row("deepnorm", 100, 2.6)]
    lines = verdict(rows)
    assert lines[0].startswith("- **pre trains without warmup**")
    assert lines[1].startswith("- **post needs warmup**") and "3.150 without warmup" in lines[1]
    assert lines[2].startswith("- **sandwich needs warmup**")  # trained, but 0.25 worse than with warmup
    assert lines[3].startswith("- **deepnorm needs warmup**") and "diverged at step 7" in lines[3]


def test_study_command(tmp_path, capsys):
    code = main(["study", "--out", str(tmp_path), "--placements", "pre", "--norms", "layernorm", "--steps", "5",
                 "--warmup", "2", *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "# Placement study" in out and "| pre | layernorm | 2 |" in out


def test_study_errors_name_the_flags_that_set_the_keys(tmp_path, capsys):
    code = main(["study", "--out", str(tmp_path), "--placements", "pre", "--norms", "layernorm", "--steps", "50",
                 *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "train.steps=50 must be greater than train.warmup_steps=100" in err
    assert "(tformer study: --steps (steps=) sets train.steps; --warmup (warmup_steps=) sets train.warmup_steps)" in err
    assert not list(tmp_path.glob("runs/*"))  # nothing trained


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_registered_placement_runs_in_the_study(tmp_path, placement):
    rows, _ = run_study(tmp_path, placements=(placement,), norms=("rmsnorm",), warmup_steps=1, steps=2,
                        target_loss=9.0, overrides=[*TINY, "log.eval_every=2"], progress=False)
    assert [r.placement for r in rows] == [placement, placement]
    assert all(r.final_val_loss < 6.0 for r in rows)  # finite, near ln(256) = 5.5 after two steps


def test_study_runs_rotary_grouped_query_models(tmp_path):
    overrides = [*TINY, "log.eval_every=2", "model.positions=rope", "model.block.n_kv_heads=1",
                 "model.block.qk_norm=full"]
    rows, _ = run_study(tmp_path, placements=("pre",), norms=("rmsnorm",), warmup_steps=1, steps=2, target_loss=9.0,
                        overrides=overrides, progress=False)
    config = (tmp_path / "runs" / "pre-rmsnorm-warmup0" / "config.yaml").read_text()
    assert "positions: rope" in config and "n_kv_heads: 1" in config
    assert all(r.final_val_loss < 6.0 for r in rows)
    # bytes: bits per byte is the loss in bits; the table and the CSV carry it
    assert all(r.final_bits_per_byte == pytest.approx(r.final_val_loss / math.log(2), rel=1e-9) for r in rows)
    assert "final_bits_per_byte" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "| final bits/byte |" in (tmp_path / "results.md").read_text()


def test_study_help_lists_every_registered_placement_and_norm(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(p in out for p in PLACEMENTS) and all(n in out for n in NORMS)


def test_bad_names_fail_before_any_run(tmp_path):
    from tformer import ConfigError

    with pytest.raises(ConfigError, match="placement='middle'"):
        run_study(tmp_path, placements=("pre", "middle"), norms=("layernorm",), steps=5, overrides=TINY, progress=False)
    assert not (tmp_path / "runs").exists()
