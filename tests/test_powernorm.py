"""PowerNorm against independent computations of the formulas in the paper / official code."""

import pytest
import torch

import tformer
from tformer import make_norm
from tformer.powernorm import PowerNorm, group_scale

C = 6
EPS = 1e-5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, C, generator=g, dtype=torch.float64) * 2 + 0.5
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 2:] = True
    return x, pad


def _psi2_from_real_tokens(x, pad):
    tokens = torch.stack([x[b, s] for b in range(x.shape[0]) for s in range(x.shape[1]) if not pad[b, s]])
    return (tokens**2).mean(0)


def _norm(**kw):
    options = dict(group_num=0, warmup_iters=3)
    options.update(kw)
    norm = make_norm("powernorm", C, **options).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, C))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, C))
    return norm


def test_official_defaults():
    norm = make_norm("powernorm", 16)
    assert (norm.alpha_fwd, norm.alpha_bwd, norm.eps, norm.warmup_iters, norm.group_num) == (0.9, 0.9, 1e-5, 10000, 1)
    torch.testing.assert_close(norm.running_psi2, torch.ones(16))
    torch.testing.assert_close(norm.nu, torch.zeros(16))
    assert set(norm.state_dict()) == {"weight", "bias", "running_psi2", "nu", "iters"}


def test_warmup_forward_uses_masked_batch_statistic():
    norm = _norm()
    x, pad = _batch()
    psi2 = _psi2_from_real_tokens(x, pad)
    expected = norm.weight * x / torch.sqrt(psi2 + EPS) + norm.bias
    torch.testing.assert_close(norm(x, padding_mask=pad), expected, rtol=0, atol=1e-12)


def test_running_statistic_cumulative_in_warmup_then_ema():
    norm = _norm(warmup_iters=3, alpha_fwd=0.8)
    running, seen = torch.ones(C, dtype=torch.float64), []
    for t in range(1, 7):
        x, pad = _batch(seed=t)
        psi2_b = _psi2_from_real_tokens(x, pad)
        y = norm(x, padding_mask=pad)
        if t <= 3:
            expected_y = norm.weight * x / torch.sqrt(psi2_b + EPS) + norm.bias
            seen.append(psi2_b)
            running = torch.stack(seen).mean(0)
        else:
            expected_y = norm.weight * x / torch.sqrt(running + EPS) + norm.bias  # running *before* update
            running = 0.8 * running + 0.2 * psi2_b
        torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.running_psi2, running, rtol=0, atol=1e-12)
        assert norm.iters.item() == t


def test_eval_uses_running_statistic_and_leaves_state():
    norm = _norm()
    x, pad = _batch()
    norm(x, padding_mask=pad)
    norm.eval()
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    expected = norm.weight * x / torch.sqrt(norm.running_psi2 + EPS) + norm.bias
    torch.testing.assert_close(norm(x, padding_mask=pad), expected, rtol=0, atol=1e-12)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("warmup_iters", [10, 0])
def test_backward_implements_the_approximate_formula(warmup_iters):
    alpha_bwd = 0.7
    norm = _norm(alpha_bwd=alpha_bwd, warmup_iters=warmup_iters)
    for step in range(3):  # later steps start from a non-zero nu
        x, pad = _batch(seed=10 + step)
        x.requires_grad_(True)
        grad_y = torch.randn(x.shape, dtype=torch.float64)
        grad_y[pad] = torch.randn(int(pad.sum()), C, dtype=torch.float64)
        nu_before = norm.nu.clone()
        running_before = norm.running_psi2.clone()
        psi2_b = _psi2_from_real_tokens(x.detach(), pad)
        y = norm(x, padding_mask=pad)
        y.backward(grad_y)

        used = psi2_b if step + 1 <= warmup_iters else running_before
        xhat = x.detach() / torch.sqrt(used + EPS)
        g = grad_y * norm.weight.detach()
        g_tilde = g - (1 - alpha_bwd) * nu_before * xhat
        expected_dx = g_tilde / torch.sqrt(psi2_b + EPS)
        real = ~pad
        expected_nu = nu_before + (g_tilde * xhat)[real].mean(0)
        torch.testing.assert_close(x.grad, expected_dx, rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.nu, expected_nu, rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.weight.grad, (grad_y * xhat).sum((0, 1)), rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.bias.grad, grad_y.sum((0, 1)), rtol=0, atol=1e-12)
        norm.zero_grad()
    assert norm.nu.abs().sum() > 0


def test_backward_is_approximate_not_autograd_of_forward():
    """The custom backward drops the psi2_B(x) dependence: it must differ from the exact gradient."""
    norm = _norm()
    x, _ = _batch()
    x.requires_grad_(True)
    norm(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    psi2 = (x2**2).mean((0, 1))
    (norm.weight * x2 / torch.sqrt(psi2 + EPS) + norm.bias).sum().backward()
    assert not torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_padding_never_moves_outputs_or_statistics():
    x, pad = _batch()
    garbage = torch.where(pad[..., None], torch.full_like(x, 1e3), x)
    results = []
    for inputs in (x, garbage):
        norm = _norm(warmup_iters=1)
        for _ in range(3):
            leaf = inputs.clone().requires_grad_(True)
            y = norm(leaf, padding_mask=pad)
            (y * torch.where(pad[..., None], 0.0, 1.0)).sum().backward()
        results.append((y.detach()[~pad], leaf.grad[~pad], norm.running_psi2.clone(), norm.nu.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_group_scaling_formula():
    x = torch.randn(2, 3, 12, dtype=torch.float64) * 3
    y = group_scale(x, 4, eps=0.0)
    groups = y.reshape(2, 3, 4, 3)
    torch.testing.assert_close(groups.pow(2).mean(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    manual = torch.cat([g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() for g in x.split(3, -1)], -1)
    torch.testing.assert_close(group_scale(x, 4), manual)


def test_group_scaling_is_applied_before_statistics():
    norm = _norm(group_num=2, warmup_iters=5)
    x, pad = _batch()
    scaled = group_scale(x, 2)
    psi2 = _psi2_from_real_tokens(scaled, pad)
    expected = norm.weight * scaled / torch.sqrt(psi2 + EPS) + norm.bias
    torch.testing.assert_close(norm(x, padding_mask=pad), expected, rtol=0, atol=1e-12)


def test_bad_group_num():
    with pytest.raises(ValueError, match="group_num"):
        PowerNorm(10, group_num=3)


def test_blocks_use_one_group_per_head_as_the_authors_models_do():
    """The authors' models build MaskPowerNorm with group_num = n_heads (their NormSelect); standalone stays 1."""
    assert make_norm("powernorm", 16).group_num == 1
    cfg = tformer.BlockConfig(d_model=16, n_heads=4, d_ff=32, norm="powernorm", placement="sandwich")
    groups = {m.group_num for m in tformer.EncoderBlock(cfg).modules() if isinstance(m, PowerNorm)}
    assert groups == {4}
    override = tformer.BlockConfig(d_model=16, n_heads=4, d_ff=32, norm="powernorm", norm_options={"group_num": 0})
    assert {m.group_num for m in tformer.EncoderBlock(override).modules() if isinstance(m, PowerNorm)} == {0}


def test_group_num_changes_the_output_as_group_scaling_says():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    one, four = make_norm("powernorm", 16, group_num=1).double().eval(), make_norm("powernorm", 16, group_num=4).double().eval()
    torch.testing.assert_close(four(x), group_scale(x, 4) / (1 + EPS) ** 0.5)  # eval, fresh running psi2 = 1
    assert not torch.allclose(one(x), four(x))


def test_powernorm_declares_its_traits():
    from tformer.norms import norm_traits

    traits = norm_traits("powernorm")
    assert traits.uses_batch_statistics and traits.needs_padding_mask and not traits.exact_gradient
