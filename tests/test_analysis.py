import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tformer
from conftest import GRID, NORMS, PLACEMENTS, covering_pairs, quick_norm_options, slow_except, stack_depth
from tformer import BlockConfig
from tformer.analysis.reproductions import REPRODUCTIONS
from tformer.analysis import (TrainingMonitor, attention_entropy, expected_gradient_scales, find_blocks,
                              gradient_scales)

V = 40
CFG = BlockConfig(d_model=16, n_heads=2, d_ff=32, attention="math")


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))


def test_rows_match_autograds_own_gradients_and_leave_grad_alone():
    model = tformer.LanguageModel(CFG, 3, V, 16)
    batch = torch.randint(0, V, (4, 10))
    rows = gradient_scales(model, batch, lm_loss)
    assert all(p.grad is None for p in model.parameters())
    lm_loss(model, batch).backward()
    d = 16
    layers = model.decoder.layers
    expected = {}
    for i, block in enumerate(layers):
        q, k, v = block.attn.qkv.weight.grad.split(d)
        expected.update({(i, "attn.q"): q, (i, "attn.k"): k, (i, "attn.v"): v, (i, "attn.out"): block.attn.out.weight.grad,
                         (i, "ffn.w1"): block.ffn.w1.weight.grad, (i, "ffn.w2"): block.ffn.w2.weight.grad,
                         (i, "attn_residual.norm"): block.attn_residual.norm.weight.grad,
                         (i, "ffn_residual.norm"): block.ffn_residual.norm.weight.grad})
    assert {(r["layer"], r["param"]) for r in rows} == set(expected)
    for r in rows:
        assert r["stack"] == "decoder"
        assert r["sublayer"] == r["param"].split(".")[0].replace("_residual", "")
        assert r["grad_norm"] == pytest.approx(expected[(r["layer"], r["param"])].norm().item(), rel=1e-5)
        assert r["ratio"] == pytest.approx(r["grad_norm"] / r["param_norm"])


def test_any_module_containing_blocks():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(tformer.EncoderBlock(CFG) for _ in range(3))
            self.readout = nn.Linear(16, 1)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.readout(x)

    model = Custom()
    rows = gradient_scales(model, torch.randn(2, 5, 16), lambda m, x: m(x).pow(2).mean())
    assert sorted({r["layer"] for r in rows}) == [0, 1, 2]
    assert {r["stack"] for r in rows} == {"encoder"}
    s2s = tformer.EncoderDecoder(dict_cfg := BlockConfig(d_model=16, n_heads=2, d_ff=32, placement="sandwich"), 2, 2, V)
    rows = gradient_scales(s2s, (torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 5))),
                           lambda m, b: m(*b).logsumexp(-1).mean())
    assert {(r["stack"], r["sublayer"]) for r in rows} == {
        ("encoder", "attn"), ("encoder", "ffn"), ("decoder", "attn"), ("decoder", "cross_attn"), ("decoder", "ffn")}
    assert {"cross_attn.k", "cross_attn_residual.norm_in", "ffn_residual.norm_out"} <= {r["param"] for r in rows}
    assert dict_cfg.placement == "sandwich"
    with pytest.raises(ValueError, match="no tformer blocks"):
        gradient_scales(nn.Linear(2, 2), torch.randn(1, 2), lambda m, x: m(x).sum())


def test_expected_gradient_is_norm_of_the_mean():
    model = tformer.LanguageModel(CFG, 2, V, 16)
    batches = [torch.randint(0, V, (3, 8)) for _ in range(4)]
    rows = expected_gradient_scales(model, batches, lm_loss)
    grads = []
    for b in batches:
        model.zero_grad()
        lm_loss(model, b).backward()
        grads.append(model.decoder.layers[1].ffn.w2.weight.grad.clone())
    row = next(r for r in rows if (r["layer"], r["param"]) == (1, "ffn.w2"))
    assert row["grad_norm"] == pytest.approx(torch.stack(grads).mean(0).norm().item(), rel=1e-5)
    assert row["mean_grad_norm"] == pytest.approx(sum(g.norm().item() for g in grads) / 4, rel=1e-5)
    assert row["n_batches"] == 4 and row["grad_norm"] < row["mean_grad_norm"]


def _hook_counts(model, optimizer):
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())
    return modules, len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


def _train_steps(model, optimizer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        batch = torch.randint(0, V, (4, 12), generator=g)
        loss = lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_detach_leaves_nothing_and_training_is_unchanged():
    torch.manual_seed(0)
    model = tformer.LanguageModel(CFG, 2, V, 16)
    twin = tformer.LanguageModel(CFG, 2, V, 16)
    twin.load_state_dict(model.state_dict())
    optimizer, twin_opt = torch.optim.Adam(model.parameters(), 1e-3), torch.optim.Adam(twin.parameters(), 1e-3)
    before = _hook_counts(model, optimizer)
    with TrainingMonitor(model, optimizer, every=2) as monitor:
        assert _hook_counts(model, optimizer) != before
        _train_steps(model, optimizer, 4)
    assert _hook_counts(model, optimizer) == before == (0, 0)
    _train_steps(twin, twin_opt, 4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # the monitor observed without changing anything
    assert {r["step"] for r in monitor.rows} == {2, 4}


def test_monitor_values_against_direct_computation():
    torch.manual_seed(0)
    model = tformer.LanguageModel(CFG, 2, V, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randint(0, V, (5, 12))
    monitor = TrainingMonitor(model, optimizer, every=1).attach()
    block = model.decoder.layers[1]
    captured = {}
    handle = block.register_forward_hook(lambda m, a, out: captured.update(out=out.detach()))
    attn_in = {}
    handle2 = block.attn.register_forward_hook(lambda m, a, out: attn_in.update(x=a[0].detach()))
    w_before = block.ffn.w2.weight.detach().clone()
    loss = lm_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    grad = block.ffn.w2.weight.grad.clone()
    x = attn_in["x"][:1]
    with torch.no_grad():  # attention entropy of the first sequence, explicitly, with the weights of the step
        q, k, _ = block.attn.qkv(x).chunk(3, -1)
        q, k = q.reshape(1, 11, 2, 8), k.reshape(1, 11, 2, 8)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
        p = scores.softmax(-1)
        expected = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)[0]
        assert torch.allclose(attention_entropy(block.attn, x), expected, rtol=1e-5)
    optimizer.step()
    monitor.detach()
    handle.remove()
    handle2.remove()

    def row(metric, **key):
        return next(r for r in monitor.rows if r["metric"] == metric and all(r.get(k) == v for k, v in key.items()))

    assert row("grad_norm", layer=1, param="ffn.w2")["value"] == pytest.approx(grad.norm().item(), rel=1e-5)
    ratio = (0.1 * grad).norm().item() / w_before.norm().item()
    assert row("update_ratio", layer=1, param="ffn.w2")["value"] == pytest.approx(ratio, rel=1e-4)
    assert row("residual_norm", layer=1)["value"] == pytest.approx(captured["out"].pow(2).mean().item(), rel=1e-5)
    for head in range(2):
        assert row("attention_entropy", layer=1, head=head)["value"] == pytest.approx(expected[head].item(), rel=1e-5)


def test_gns_matches_per_example_gradients():
    torch.manual_seed(0)
    model = tformer.LanguageModel(BlockConfig(d_model=16, n_heads=2, d_ff=32, placement="sandwich"), 2, V, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = torch.randint(0, V, (6, 12))
    norm_params = [p for block in model.decoder.layers for _, placement in block.residual_sublayers().values()
                   for name, norm in placement.named_children() if name.startswith("norm")
                   for p in (norm.weight, norm.bias)]
    per_example = []
    for i in range(6):
        grads = torch.autograd.grad(lm_loss(model, batch[i : i + 1]), norm_params)
        per_example.append(torch.cat([g.flatten() for g in grads]))
    g = torch.stack(per_example)
    s_1, s_b = g.pow(2).sum(1).mean().item(), g.mean(0).pow(2).sum().item()
    b = 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = TrainingMonitor(model, optimizer, every=1, attention_entropy=False).attach()
    loss = lm_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    monitor.detach()
    row = next(r for r in monitor.rows if r["metric"] == "gns")
    assert row["s_1"] == pytest.approx(s_1, rel=1e-4) and row["s_b"] == pytest.approx(s_b, rel=1e-4)
    assert row["g2"] == pytest.approx((b * s_b - s_1) / (b - 1), rel=1e-3)
    assert row["trace_sigma"] == pytest.approx((s_1 - s_b) / (1 - 1 / b), rel=1e-4)
    if row["g2"] > 0:
        assert row["value"] == pytest.approx(row["trace_sigma"] / row["g2"], rel=1e-6)
    else:  # |G|^2 is not yet resolved above the noise at this batch size: no ratio is reported
        assert row["value"] is None


def test_training_recipe_writes_monitor_rows_and_plots(tmp_path):
    from tformer.recipe_config import load_config
    from tformer.training import recipe_defaults, train

    config = load_config(recipe_defaults("lm"), None, [
        "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
        "model.block.d_ff=64", "data.seq_len=32", "data.eval_windows=4", "train.batch_size=4", "train.steps=10",
        "log.progress=false", "log.monitor=true", "log.monitor_every=5", f"out_dir={tmp_path}"])
    train(config)
    from tformer.analysis.plots import load_rows

    rows = load_rows(tmp_path / "run" / "monitor.jsonl")
    assert {r["step"] for r in rows} == {5, 10}
    assert {"grad_norm", "update_ratio", "residual_norm", "attention_entropy", "gns"} == {r["metric"] for r in rows}
    for name in ("update_ratio.png", "grad_norm.png", "residual_norm.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("norm, placement", slow_except(GRID, covering_pairs(NORMS, PLACEMENTS)))
def test_monitor_and_gradient_scales_for_every_norm_and_placement(norm, placement):
    """Every norm and every placement (stack-level ones too) by default, the full product under slow:
    the monitor and ``gradient_scales`` find every block and give finite rows for each layer."""
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm=norm, placement=placement, attention="math",
                      norm_options=quick_norm_options(norm))
    depth = stack_depth(placement)
    torch.manual_seed(0)
    model = tformer.LanguageModel(cfg, depth, V, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with TrainingMonitor(model, optimizer, every=1) as monitor:
        _train_steps(model, optimizer, 2)
    metrics = {r["metric"] for r in monitor.rows}
    assert {"grad_norm", "update_ratio", "residual_norm", "attention_entropy"} <= metrics
    residual = [r for r in monitor.rows if r["metric"] == "residual_norm"]
    assert sorted((r["step"], r["layer"]) for r in residual) == [(s, i) for s in (1, 2) for i in range(depth)]
    for row in monitor.rows:
        assert row["value"] is None and row["metric"] == "gns" or math.isfinite(row["value"]), row
    rows = gradient_scales(model, torch.randint(0, V, (2, 8)), lm_loss)
    assert {r["layer"] for r in rows} == set(range(depth))
    assert all(math.isfinite(r["grad_norm"]) for r in rows)


def test_find_blocks_order():
    s2s = tformer.EncoderDecoder(CFG, 2, 3, V)
    assert [(s, i) for s, i, _, _ in find_blocks(s2s)] == [("encoder", 0), ("encoder", 1), ("decoder", 0),
                                                           ("decoder", 1), ("decoder", 2)]


def test_lemma2_reproduction_quick(tmp_path):
    from tformer.analysis.reproductions import run_reproduction

    out = run_reproduction("xiong-lemma2", tmp_path, quick=True)
    summary = (out / "summary.md").read_text()
    assert "**Paper**" in summary and "**Measured**" in summary and "`tformer analyze xiong-lemma2 --quick`" in summary
    assert (out / "residual_norms.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "residual_norms.csv").read_text().splitlines()
    assert rows[0] == "placement,layer,norm_sq_over_d" and len(rows) == 13


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REPRODUCTIONS))
def test_full_reproductions(tmp_path, name):
    """The reproduction commands at full settings (run by .ci/run through -m slow); the two that train for
    minutes (deepnet-depth about 10, powernorm about 3) at --quick, to keep CI inside its budget."""
    from tformer.cli import main

    quick = ["--quick"] if name in ("deepnet-depth", "powernorm") else []
    assert main(["analyze", name, "--out", str(tmp_path), *quick]) == 0
    assert "**Measured**" in (tmp_path / name / "summary.md").read_text()
