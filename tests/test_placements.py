"""Each placement against its formula, computed independently with a known norm and sublayer."""

import math

import pytest
import torch
from torch import nn

import tformer
from tformer.norms import NormFactory
from tformer.placements import PLACEMENTS, LayerContext, build_placement

D = 8


class AffineNorm(nn.Module):
    """A recognisable stand-in norm: LayerNorm without affine, then a distinct scale per instance."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, padding_mask=None):
        return self.scale * torch.nn.functional.layer_norm(x, x.shape[-1:])


def _norm_factory():
    counter = iter(range(2, 100))
    return NormFactory(lambda: AffineNorm(float(next(counter))), D)


def ln(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:])


W = torch.randn(D, D, dtype=torch.float64)


def sublayer(h):
    return torch.tanh(h @ W)


LAYER = LayerContext("encoder", index=2, n_layers=6)
ALPHA, BETA = tformer.deepnorm_constants(6, 0)["encoder"]

# The expected update of each registered placement, written from REFERENCE.md's table.
# Norm instances are created in order with scales 2, 3, ...: the first norm has scale 2.
FORMULAS = {
    "post": lambda x: 2 * ln(x + sublayer(x)),
    "pre": lambda x: x + sublayer(2 * ln(x)),
    "sandwich": lambda x: x + 3 * ln(sublayer(2 * ln(x))),
    "deepnorm": lambda x: 2 * ln(ALPHA * x + sublayer(x)),
    "output": lambda x: x + 2 * ln(sublayer(x)),
    "rezero": lambda x: x + 0.0 * sublayer(x),
    "lnscaling": lambda x: x + sublayer(2 * ln(x) / math.sqrt(3)),  # layer index 2 -> l = 3
    "mixln": lambda x: x + sublayer(2 * ln(x)),  # layer 2 of 6: floor(0.25 * 6) = 1 post layer, so pre
    # Stack-level placements, one sublayer from begin(x) to end(stream) without a final norm:
    # ResiDual: x_a = 2 ln(x + F(x)), x_d = x + F(x), out = x_a + x_d.
    "resi_dual": lambda x: 2 * ln(x + sublayer(x)) + x + sublayer(x),
    # Hyper-connections at init (4 equal streams, a_m = e_(2 mod 4), a_r = I, b = 1): out = sum of
    # the 4 streams x + F(2 ln x). tests/test_stack_placements.py checks them with trained weights.
    "hyper": lambda x: 4 * (x + sublayer(2 * ln(x))),
}


def test_every_registered_placement_has_a_formula_test():
    assert set(PLACEMENTS) == set(FORMULAS)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placement_formula(name):
    placement = build_placement(name, _norm_factory(), LAYER).double()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    out = placement.end(placement(placement.begin(x), sublayer), None)
    torch.testing.assert_close(out, FORMULAS[name](x), rtol=0, atol=1e-12)


def test_deepnorm_scales_the_residual_not_the_branch():
    placement = build_placement("deepnorm", lambda: tformer.make_norm("none", D), LAYER).double()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(placement(x, sublayer), ALPHA * x + sublayer(x))
    assert not torch.allclose(placement(x, sublayer), x + ALPHA * sublayer(x))
    assert placement.branch_init.gain == pytest.approx(BETA) and placement.branch_init.normal


def test_rezero_weight_starts_at_zero_and_learns():
    placement = build_placement("rezero", _norm_factory(), LAYER).double()
    placement.resweight.data.fill_(0.3)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(placement(x, sublayer), x + 0.3 * sublayer(x))


@pytest.mark.parametrize("n_layers, n_post", [(1, 0), (4, 1), (8, 2), (12, 3), (6, 1)])
def test_mixln_post_fraction(n_layers, n_post):
    names = [build_placement("mixln", _norm_factory(), LayerContext("decoder", i, n_layers)).name for i in range(n_layers)]
    assert names == ["post"] * n_post + ["pre"] * (n_layers - n_post)


@pytest.mark.parametrize(
    "name, needs", [("pre", True), ("sandwich", True), ("output", True), ("lnscaling", True), ("resi_dual", True),
                    ("hyper", True), ("post", False), ("deepnorm", False), ("rezero", False)],
)
def test_final_norm_flags(name, needs):
    assert build_placement(name, _norm_factory(), LAYER).needs_final_norm is needs


def test_residual_dropout_site():
    torch.manual_seed(0)
    placement = build_placement("pre", _norm_factory(), LAYER, dropout=0.5).double()
    x = torch.randn(4, 16, D, dtype=torch.float64)
    branch = placement(x, sublayer) - x
    dropped = branch == 0
    assert 0.3 < dropped.double().mean() < 0.7  # dropout acts on the branch, never on the residual
    kept = ~dropped
    torch.testing.assert_close(branch[kept], 2 * sublayer(2 * ln(x))[kept])


def test_layer_context_validation():
    with pytest.raises(ValueError, match="stack"):
        LayerContext("middle")
    with pytest.raises(ValueError, match="index"):
        LayerContext("encoder", index=3, n_layers=3)
