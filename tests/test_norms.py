import pytest
import torch
from torch import nn

import tformer
from tformer import ConfigError, make_norm
from tformer.norms import NORMS, norm_traits

D = 8


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def test_layernorm_matches_torch():
    ours = _randomize(make_norm("layernorm", D, eps=1e-6)).double()
    ref = nn.LayerNorm(D, eps=1e-6).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), ref(x_ref), rtol=0, atol=1e-12)
    ours(x).pow(2).sum().backward()
    ref(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)


def test_layernorm_without_bias():
    norm = make_norm("layernorm", D, bias=False)
    assert norm.bias is None


def test_rmsnorm_formula_and_torch_parity():
    ours = _randomize(make_norm("rmsnorm", D, eps=1e-6)).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    expected = ours.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)
    ref = nn.RMSNorm(D, eps=1e-6).double()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


def test_dyt_formula():
    norm = _randomize(make_norm("dyt", D, alpha_init=0.7)).double()
    assert norm.alpha_init == 0.7
    x = torch.randn(2, 4, D, dtype=torch.float64)
    expected = norm.weight * torch.tanh(norm.alpha * x) + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    assert make_norm("dyt", D).alpha.item() == 0.5


def test_none_is_identity():
    x = torch.randn(2, 3, D)
    assert make_norm("none", D)(x) is x


@pytest.mark.parametrize("name", list(NORMS))
def test_every_norm_shape_and_padding_argument(name):
    norm = make_norm(name, D)
    x = torch.randn(2, 5, D)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    assert norm(x, padding_mask=pad).shape == x.shape
    assert norm(x).shape == x.shape


@pytest.mark.parametrize("name", [n for n in NORMS if norm_traits(n).exact_gradient])
def test_gradcheck_exact_norms(name):
    """Every norm that declares an exact gradient has it (PowerNorm's and AdaNorm's backward are not the
    gradient of their forward by design; their own tests check what they compute instead)."""
    norm = _randomize(make_norm(name, D)).double()
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    params = tuple(norm.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: norm(x), (x, *params))


@pytest.mark.parametrize("name", list(NORMS))
def test_padding_contents_do_not_change_real_positions(name):
    norm = make_norm(name, D)
    x = torch.randn(3, 6, D)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    garbage = torch.where(pad[..., None], torch.randn_like(x) * 100, x)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    y1 = norm(x, padding_mask=pad)
    after_first = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.load_state_dict(state)
    y2 = norm(garbage, padding_mask=pad)
    torch.testing.assert_close(y1[~pad], y2[~pad])
    for key, value in norm.state_dict().items():
        torch.testing.assert_close(value, after_first[key])


def test_make_norm_errors():
    with pytest.raises(ConfigError, match=r"norm='groupnorm'.*'layernorm'.*'rmsnorm'.*'batchnorm'"):
        make_norm("groupnorm", D)
    with pytest.raises(ConfigError, match=r"alpha_init"):
        make_norm("dyt", D, alpha=1.0)
    with pytest.raises(ConfigError, match="valid options: unit_offset"):
        make_norm("rmsnorm", D, warmup_iters=3)
    with pytest.raises(ConfigError, match="valid options: none"):
        make_norm("layernorm", D, warmup_iters=3)
    with pytest.raises(ConfigError, match="unit_offset=1 must be True or False"):
        make_norm("rmsnorm", D, unit_offset=1)


def test_rmsnorm_unit_offset_is_gemmas_one_plus_weight():
    torch.manual_seed(0)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    norm = make_norm("rmsnorm", D, eps=1e-6, unit_offset=True).double()
    assert torch.equal(norm.weight, torch.zeros(D, dtype=torch.float64))  # starts as the identity gain
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    weight = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
                                    (x[:1, :2].clone().requires_grad_(), weight))


def test_deepnorm_is_a_config_shorthand_not_a_norm():
    """``norm="deepnorm"`` is resolved by BlockConfig alone; the norm registry does not know it."""
    assert "deepnorm" not in tformer.NORMS
    with pytest.raises(ConfigError, match=r"BlockConfig shorthand.*make_norm\('layernorm'"):
        make_norm("deepnorm", D)
    cfg = tformer.BlockConfig(d_model=D, n_heads=2, d_ff=8, norm="deepnorm")
    assert (cfg.norm, cfg.placement) == ("layernorm", "deepnorm")


def test_rmsnorm_function_matches_native_in_float32_and_bf16():
    norm = _randomize(make_norm("rmsnorm", 64, eps=1e-6))
    x = torch.randn(3, 7, 64) * 3
    grad = torch.randn(3, 7, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    y1 = norm(x1)
    y2 = torch.nn.functional.rms_norm(x2, (64,), w2, 1e-6)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(norm.weight.grad, w2.grad)
    xb = x.bfloat16().requires_grad_()
    yb = norm(xb)
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    torch.testing.assert_close(yb.float(), y2.detach(), rtol=2e-2, atol=2e-2)


def test_layernorm_simple_is_layernorm_without_affine():
    x = torch.randn(3, 5, D, dtype=torch.float64)
    reference = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6).double()
    norm = make_norm("layernorm_simple", D, eps=1e-6)
    assert not list(norm.parameters())
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=1e-12)


def test_adanorm_forward_and_its_detached_backward():
    """z = C (1 - k y) y with the factor C (1 - k y) a constant in backward (Xu et al. 2019)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, D, dtype=torch.float64, requires_grad=True)
    norm = make_norm("adanorm", D, eps=1e-6, k=0.1, scale=2.0)
    z = norm(x)
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) / ((x - mean).square().mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(z, 2.0 * (1 - 0.1 * y) * y, rtol=0, atol=1e-12)
    upstream = torch.randn_like(z)
    (grad,) = torch.autograd.grad(z, x, upstream)
    (expected,) = torch.autograd.grad(y, x, upstream * (2.0 * (1 - 0.1 * y)).detach(), retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    (full,) = torch.autograd.grad(2.0 * (1 - 0.1 * y) * y, x, upstream)  # what not detaching would give
    assert (full - grad).abs().max() > 1e-3


def test_batchnorm_uses_only_real_tokens_and_running_statistics_like_batchnorm1d():
    torch.manual_seed(0)
    x = torch.randn(3, 6, D, dtype=torch.float64) * 2 + 1
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = pad[2, 1:] = True
    norm = make_norm("batchnorm", D, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference = nn.BatchNorm1d(D, eps=1e-5, momentum=0.1).double()
    reference.load_state_dict({"weight": norm.weight, "bias": norm.bias, "running_mean": norm.running_mean,
                               "running_var": norm.running_var, "num_batches_tracked": torch.tensor(0)})
    out = norm(x, padding_mask=pad)
    torch.testing.assert_close(out[~pad], reference(x[~pad]), rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, reference.running_var, rtol=0, atol=1e-12)
    norm.eval(), reference.eval()
    torch.testing.assert_close(norm(x)[~pad], reference(x[~pad]), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: make_norm("batchnorm", D).double()(t, padding_mask=pad),
                                    (x.clone().requires_grad_(),))
    norm.train()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    out = norm(x, padding_mask=torch.ones_like(pad))  # no real token: finite output, statistics untouched
    assert torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())
