import math

import pytest
import torch

import tformer
from tformer import ConfigError, make_scheduler
from tformer.schedulers import SCHEDULERS

LR = 0.5


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


def lrs(name, steps, **kw):
    sched = make_scheduler(optimizer(), name, **kw)
    values = [sched.get_last_lr()[0]]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        values.append(sched.get_last_lr()[0])
    return values


def expected(name, t, W, T, floor=0.0):
    if name != "none" and t < W:
        return LR * t / W
    p = None if T is None else min(max((t - W) / (T - W), 0), 1)
    if name in ("none", "constant"):
        return LR
    if name == "inverse_sqrt":
        return LR * math.sqrt(W / t) if W else LR / math.sqrt(max(t, 1))
    if name == "linear":
        return LR * (floor + (1 - floor) * (1 - p))
    if name == "cosine":
        return LR * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
    if name == "wsd":
        start = T - round(0.2 * T)
        return LR if t <= start else LR * (floor + (1 - floor) * (1 - (min(t, T) - start) / (T - start)))
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("warmup", [0, 7])
def test_formula_step_by_step(name, warmup):
    T = 40
    values = lrs(name, 50, warmup_steps=warmup, total_steps=T)
    for t, value in enumerate(values):
        assert value == pytest.approx(expected(name, t, warmup, T), abs=1e-12), (name, t)


def test_contract_examples():
    values = lrs("inverse_sqrt", 20, warmup_steps=4)
    assert values[:5] == pytest.approx([0, LR / 4, LR / 2, 3 * LR / 4, LR])
    assert values[16] == pytest.approx(LR * math.sqrt(4 / 16))
    assert lrs("cosine", 30, warmup_steps=10, total_steps=30)[30] == pytest.approx(0.0, abs=1e-12)
    assert lrs("linear", 30, warmup_steps=10, total_steps=30)[20] == pytest.approx(LR / 2)
    wsd = lrs("wsd", 100, warmup_steps=10, total_steps=100)
    assert wsd[80] == LR and wsd[90] == pytest.approx(LR / 2) and wsd[100] == pytest.approx(0.0, abs=1e-12)


def test_floor():
    values = lrs("cosine", 40, warmup_steps=0, total_steps=30, min_lr_ratio=0.1)
    assert values[30] == pytest.approx(0.1 * LR) and values[40] == pytest.approx(0.1 * LR)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_resume_mid_curve(name):
    opt = optimizer()
    sched = make_scheduler(opt, name, warmup_steps=5, total_steps=30)
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    reference = [sched.get_last_lr()[0]]
    for _ in range(10):
        opt.step()
        sched.step()
        reference.append(sched.get_last_lr()[0])

    opt2 = optimizer()
    resumed = make_scheduler(opt2, name, warmup_steps=5, total_steps=30)
    resumed.load_state_dict(state)
    opt2.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    values = [resumed.get_last_lr()[0]]
    for _ in range(10):
        opt2.step()
        resumed.step()
        values.append(resumed.get_last_lr()[0])
    assert values == pytest.approx(reference, abs=1e-15)
    assert isinstance(resumed, torch.optim.lr_scheduler.LRScheduler)


def test_errors():
    with pytest.raises(ConfigError, match=r"scheduler=.*'inverse_sqrt'"):
        make_scheduler(optimizer(), "step")
    with pytest.raises(ConfigError, match="needs total_steps"):
        make_scheduler(optimizer(), "cosine", warmup_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        make_scheduler(optimizer(), "constant", warmup_steps=-1)
    with pytest.raises(ConfigError, match="total_steps=5"):
        make_scheduler(optimizer(), "linear", warmup_steps=10, total_steps=5)
    with pytest.raises(ConfigError, match="does not take"):
        make_scheduler(optimizer(), "constant", decay_fraction=0.5)
    assert tformer.make_scheduler is make_scheduler
