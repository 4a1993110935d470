"""Round-two science: Ba et al.'s invariances measured, the PowerNorm study's statistics probe and runs."""

import math

import pytest
import torch
from torch import nn

from tformer.analysis.invariance import (
    PAPER, TRANSFORMS, invariance_table, is_invariant, measure_invariances, paper_check,
)
from tformer.analysis.powernorm_study import StatisticsProbe, train_encoder
from tformer.batchnorm import SequenceBatchNorm
from tformer.powernorm import PowerNorm


@pytest.fixture(scope="module")
def table():
    return {r["norm"]: r for r in invariance_table()}


def test_measured_invariances_agree_with_ba_et_al(table):
    assert paper_check(list(table.values())) == {"batch norm": [], "weight norm": [], "layer norm": []}
    assert [is_invariant(table["batchnorm"][t]) for t in TRANSFORMS] == list(PAPER["batch norm"])


def test_invariances_beyond_the_paper(table):
    def invariant(name):
        return tuple(is_invariant(table[name][t]) for t in TRANSFORMS)

    layer = PAPER["layer norm"]
    assert invariant("layernorm_simple") == invariant("adanorm") == layer
    rms_like = (True, False, False, True, False, True)  # no mean subtracted: layer norm minus re-centering
    assert invariant("rmsnorm") == invariant("scalenorm") == rms_like
    assert not any(invariant("dyt")) and not any(invariant("none"))
    assert not any(invariant("batchnorm (eval: running statistics)"))
    assert invariant("powernorm (no group scaling)") == (True, False, True, True, False, False)
    assert not any(invariant("powernorm (no group scaling, after warmup)"))


def test_a_non_invariance_is_far_from_the_tolerance(table):
    """The measurement separates the classes by orders of magnitude, not by a hair at the tolerance."""
    changes = [r[t] for r in table.values() for t in TRANSFORMS]
    assert max(c for c in changes if is_invariant(c)) < 1e-4 / 3
    assert min(c for c in changes if not is_invariant(c)) > 1e-2


def test_an_unnormalized_layer_is_invariant_to_nothing():
    changes = measure_invariances(nn.Identity())
    assert all(c > 0.05 for c in changes.values())


def test_statistics_probe_against_a_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8) * 2 + 1
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    bn = SequenceBatchNorm(8).train()
    bn.running_mean.fill_(0.5)
    probe = StatisticsProbe(bn)
    bn(x, mask)
    real = x[~mask].double()
    expected_mean = (real.mean(0) - 0.5).norm() / 8
    expected_var = (real.var(0, unbiased=False) - 1.0).norm() / 8
    assert probe.rows[0]["mean"] == pytest.approx(float(expected_mean), rel=1e-9)
    assert probe.rows[0]["var"] == pytest.approx(float(expected_var), rel=1e-9)
    pn = PowerNorm(8, group_num=0).train()
    probe = StatisticsProbe(pn)
    pn(x, padding_mask=mask)
    assert probe.rows[0]["psi2"] == pytest.approx(float((real.square().mean(0) - 1.0).norm() / 8), rel=1e-9)
    probe.remove()
    pn(x, padding_mask=mask)
    assert len(probe.rows) == 1


def test_masked_bytes_batches():
    from tformer.analysis.powernorm_study import MASK, PAD, MaskedBytes
    from tformer.data import corpus_splits

    tokens, _ = corpus_splits()
    data = MaskedBytes(tokens, 64, seed=3)
    inputs, targets, padding = data.batch(5)
    assert inputs.shape == targets.shape == padding.shape == (64, 64)
    lengths = (~padding).sum(1)
    assert lengths.min() >= 16 and lengths.max() <= 64 and (padding == (inputs == PAD)).all()
    masked = targets != -100
    assert (inputs[masked] == MASK).all() and not (masked & padding).any()
    assert 0.1 < masked.sum() / (~padding).sum() < 0.2
    assert torch.equal(data.batch(5)[0], inputs) and not torch.equal(data.batch(6)[0], inputs)


@pytest.mark.parametrize("norm", ["layernorm", "powernorm", "batchnorm"])
def test_masked_byte_encoder_learns_with_every_norm(norm):
    run = train_encoder(norm, 0, steps=60, n_layers=2, d_model=32, n_val=64)
    assert run["status"] == "trained" and len(run["curve"]) == 60
    assert sum(run["curve"][-10:]) / 10 < sum(run["curve"][:10]) / 10 - 1.0  # from about ln(258) = 5.55 down
    assert math.isfinite(run["val_loss"]) and 0 <= run["val_accuracy"] <= 1
    assert len(run["stats"]) == (0 if norm == "layernorm" else 60)


def test_analyze_invariance_writes_the_yes_no_table(tmp_path):
    """API.md: DIR/invariance.csv, one row per registered norm, yes/no per transformation, plus a PNG."""
    import csv

    from tformer import NORMS
    from tformer.analysis.invariance import COLUMNS
    from tformer.cli import main

    assert main(["analyze", "invariance", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "invariance.csv") as f:
        rows = {r["norm"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(NORMS)
    assert list(rows["layernorm"])[1:] == list(COLUMNS)
    assert [rows["layernorm"][c] for c in COLUMNS] == ["yes", "yes", "no", "yes", "no", "yes"]
    assert [rows["batchnorm"][c] for c in COLUMNS] == ["yes", "no", "yes", "yes", "yes", "no"]
    assert (tmp_path / "invariance.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Measured**" in (tmp_path / "invariance" / "summary.md").read_text()
