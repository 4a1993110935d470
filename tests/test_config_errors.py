"""Bad recipe configs stop with a ConfigError naming the key, the value and what is valid; --print-config checks
what a run checks; a resumed run reports every changed key; the study's verdict needs a warmup arm that trained."""

import json
import random

import pytest
import torch

from tformer import CheckpointError, ConfigError
from tformer.cli import main
from tformer.recipe_config import load_config
from tformer.study import StudyRow, arm_status, verdict
from tformer.training import recipe_defaults, train, train_state
from tformer.training.distributed import Dist
from tformer.training.schema import RULES, check_recipe, validate_recipe

TINY_LM = [
    "model.n_layers=1", "model.max_seq_len=16", "model.block.d_model=16", "model.block.n_heads=2",
    "model.block.d_ff=32", "data.seq_len=16", "data.eval_windows=4", "train.batch_size=4", "train.warmup_steps=2",
    "log.every=1", "log.eval_every=4", "log.progress=false",
]
TINY_SEQ2SEQ = [
    "model.n_encoder_layers=1", "model.n_decoder_layers=1", "model.block.d_model=16", "model.block.n_heads=2",
    "model.block.d_ff=32", "train.batch_size=4", "data.eval_examples=4", "train.warmup_steps=2", "log.progress=false",
]

# (override(s), the message's content): every numeric key, wrong types, choices, and keys that constrain each other
LM_ERRORS = [
    (["train.steps=0"], "train.steps=0 must be a positive integer"),
    (["train.steps=-3"], "train.steps=-3 must be a positive integer"),
    (["train.steps=abc"], "train.steps='abc' must be an integer"),
    (["train.steps=2.5"], "train.steps=2.5 must be an integer"),
    (["train.schedule=cosine", "train.steps=5", "train.warmup_steps=10"],
     "train.steps=5 must be greater than train.warmup_steps=10: train.schedule='cosine' decays"),
    (["train.schedule=linear", "train.steps=10", "train.warmup_steps=10"],
     "train.steps=10 must be greater than train.warmup_steps=10"),
    (["train.schedule=wsd", "train.steps=3", "train.warmup_steps=3"], "or use a schedule that does not decay to an "
                                                                      "end (none, constant, inverse_sqrt)"),
    (["train.batch_size=0"], "train.batch_size=0 must be a positive integer"),
    (["train.batch_size=null"], "train.batch_size=None must be a positive integer"),
    (["train.lr=[1]"], "train.lr=[1] must be a number"),
    (["train.lr=-1"], "train.lr=-1.0 must be a finite number >= 0"),
    (["train.lr=.nan"], "train.lr=nan must be a finite number >= 0"),
    (["train.lr=inf"], "train.lr=inf must be a finite number >= 0"),
    (["train.betas=[0.9]"], "train.betas=[0.9] must be two numbers in [0, 1)"),
    (["train.betas=[0.9, 1.5]"], "train.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (["train.eps=-1e-8"], "train.eps=-1e-08 must be a finite number >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be a finite number >= 0"),
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be a finite number >= 0 (the largest gradient norm; 0: no "
                             "clipping)"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1 must be an integer >= 0 (0: no warmup)"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio=2.0 must be a number in [0, 1]"),
    (["train.schedule=cosin"], "train.schedule='cosin'; valid choices: 'none', 'constant', 'inverse_sqrt', 'linear', "
                               "'cosine', 'wsd' (did you mean 'cosine'?)"),
    (["train.precision=fp8"], "train.precision='fp8'; valid choices: 'fp32', 'bf16', 'fp16'"),
    (["train.precision=fp16"], "train.precision='fp16' needs a CUDA device"),
    (["train.grad_accum=0"], "train.grad_accum=0 must be an integer >= 1"),
    (["train.parallel=zero"], "train.parallel='zero'; valid choices: 'ddp', 'fsdp'"),
    (["train.compile=maybe"], "train.compile='maybe' must be true or false"),
    (["train.peak_tflops=-5"], "train.peak_tflops=-5.0 must be a finite number >= 0"),
    (["log.every=0"], "log.every=0 must be a positive integer"),
    (["log.eval_every=0"], "log.eval_every=0 must be a positive integer"),
    (["log.checkpoint_every=-1"], "log.checkpoint_every=-1 must be an integer >= 0 (a checkpoint every that many "
                                  "steps; 0: none)"),
    (["log.keep_checkpoints=-1"], "log.keep_checkpoints=-1 must be an integer >= 0"),
    (["log.monitor_every=0"], "log.monitor_every=0 must be a positive integer"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    (["device=gpu"], "device='gpu' is not a device; valid choices: 'auto', 'cpu', 'cuda'"),
    (["run="], "run='' must be a non-empty string"),
    (["model.n_layers=0"], "model.n_layers=0 must be a positive integer"),
    (["model.max_seq_len=8"], "data.seq_len=16 exceeds model.max_seq_len=8"),
    (["model.positions=absolute"], "model.positions='absolute'; valid choices: 'learned', 'sinusoidal', 'rope'"),
    (["model.block.d_model=30", "model.block.n_heads=4"],
     "model.block.d_model=30 is not divisible by model.block.n_heads=4"),
    (["model.block.norm=layrnorm"], "model.block.norm='layrnorm' is not a known norm; valid choices: 'layernorm'"),
    (["model.block.placement=middle"], "model.block.placement='middle' is not a known placement"),
    (["model.block.dropout=1.5"], "model.block.dropout=1.5 must be a probability in [0, 1)"),
    (["model.block.n_kv_heads=3"], "model.block.n_kv_heads=3 must divide model.block.n_heads=2"),
    (["model.block.norm_options={foo: 1}"], "model.block.norm_options={'foo': 1}: foo not accepted by norm"),
    (["model.block.norm=powernorm", "model.block.norm_options={warmup_iters: abc}"],
     "model.block.norm_options.warmup_iters='abc' must be an integer for norm 'powernorm'"),
    (["model.block.norm=powernorm", "model.block.norm_options={group_num: 3}"],
     "model.block.norm_options.group_num=3 "),
    (["model.positions=rope", "model.block.d_model=18", "model.block.n_heads=6"],
     "model.positions='rope' rotates pairs of features and needs an even head width, got model.block.d_model=18 / "
     "model.block.n_heads=6 = 3"),
    (["model.block.attention=xformers"], "model.block.attention='xformers' cannot run here"),
    (["data.seq_len=0"], "data.seq_len=0 must be a positive integer"),
    (["data.val_fraction=1"], "data.val_fraction=1.0 must be a number in (0, 1)"),
    (["data.val_fraction=0.00001"], "data.seq_len=16 is too long for the validation part of data.path='python_docs'"),
    (["data.eval_windows=0"], "data.eval_windows=0 must be a positive integer"),
    (["data.tokenizer=wordpiece"], "data.tokenizer='wordpiece'; valid choices: 'byte', 'bpe'"),
    (["data.tokenizer=bpe", "data.vocab_size=100"], "data.vocab_size=100 must be an integer of at least 257"),
    (["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt': no such file"),
    (["model.init_from=/nonexistent/model.safetensors"],
     "model.init_from='/nonexistent/model.safetensors': /nonexistent/model.safetensors: no such file"),
    (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
]

SEQ2SEQ_ERRORS = [
    (["data.min_len=5", "data.max_len=3"], "data.min_len=5 must be <= data.max_len=3"),
    (["data.vocab_size=3"], "data.vocab_size=3 must be an integer >= 4"),
    (["data.task=translate"], "data.task='translate'; valid choices: 'copy', 'reverse', 'sort'"),
    (["data.eval_examples=0"], "data.eval_examples=0 must be a positive integer"),
    (["model.n_encoder_layers=0"], "model.n_encoder_layers=0 must be a positive integer"),
    (["train.batch_size=0"], "train.batch_size=0 must be a positive integer"),
]


def _config(tmp_path, *overrides, task="lm"):
    base = TINY_LM if task == "lm" else TINY_SEQ2SEQ
    return load_config(recipe_defaults(task), None, [*base, f"out_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("overrides, message", LM_ERRORS, ids=[" ".join(o) for o, _ in LM_ERRORS])
def test_train_stops_before_training_naming_the_key_value_and_valid_choices(tmp_path, capsys, overrides, message):
    code = main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=3", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert err.startswith("tformer train: error: ")
    assert not (tmp_path / "run").exists()  # stopped before anything was written


@pytest.mark.parametrize("overrides, message", SEQ2SEQ_ERRORS, ids=[" ".join(o) for o, _ in SEQ2SEQ_ERRORS])
def test_seq2seq_config_errors(tmp_path, capsys, overrides, message):
    assert main(["train", "--task", "seq2seq", *TINY_SEQ2SEQ, f"out_dir={tmp_path}", *overrides, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize("overrides, message", [
    (["model.block.norm=layrnorm"], "model.block.norm='layrnorm' is not a known norm"),
    (["data.path=/nonexistent/corpus.txt"], "no such file"),
    (["model.block.d_model=30", "model.block.n_heads=4"], "model.block.d_model=30 is not divisible"),
    (["train.steps=0"], "train.steps=0 must be a positive integer"),
])
def test_print_config_checks_what_the_run_checks(tmp_path, capsys, overrides, message):
    """--print-config exits non-zero with the run's own message (no traceback), printing no config."""
    assert main(["train", *TINY_LM, f"out_dir={tmp_path}", *overrides, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and "Traceback" not in captured.err
    with pytest.raises(ConfigError) as raised:  # train() refuses the same config with the same message
        train(_config(tmp_path, *overrides))
    assert str(raised.value) in captured.err
    assert not (tmp_path / "run").exists()


def test_print_config_prints_a_valid_config_and_writes_nothing(tmp_path, capsys):
    assert main(["train", *TINY_LM, f"out_dir={tmp_path / 'out'}", "train.lr=3e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task: lm") and "lr: 0.0003" in out
    assert not (tmp_path / "out").exists()


def test_print_config_checks_that_the_run_directory_can_be_written(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", *TINY_LM, f"out_dir={blocker / 'runs'}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert (f"out_dir='{blocker / 'runs'}', run='run': cannot create the run directory {blocker / 'runs' / 'run'}: "
            f"{blocker} is not a directory") in err
    # a read-only file system (simulated: as root, permission bits do not bind)
    monkeypatch.setattr(train_state.os, "access", lambda path, mode: False)
    assert main(["train", *TINY_LM, f"out_dir={tmp_path / 'out'}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the run directory {tmp_path / 'out' / 'run'}: {tmp_path} is not writable" in err
    assert not (tmp_path / "out").exists()


def test_print_config_refuses_to_resume_a_different_model(tmp_path, capsys):
    assert main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=4", "model.block.placement=post",
                 "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different model (model.block.placement: 'pre' -> 'post')" in err
    assert "resume=false" in err


def test_every_schema_key_has_a_rule():
    """A key added to the schema without a validation rule fails here (model.block is checked as a whole)."""
    def leaves(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict) and value and prefix + key != "model.block":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    for task in ("lm", "seq2seq"):
        assert set(leaves(recipe_defaults(task))) == set(RULES[task]), task


def test_check_recipe_writes_nothing_and_leaves_the_rng_alone(tmp_path):
    config = _config(tmp_path / "out")
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    check_recipe(config)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert not (tmp_path / "out").exists()


def test_validate_recipe_needs_every_key(tmp_path):
    config = _config(tmp_path)
    del config["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train.lr is missing from the config"):
        validate_recipe(config)
    with pytest.raises(ConfigError, match="task=7; valid choices: 'lm', 'seq2seq'"):
        validate_recipe({**_config(tmp_path), "task": 7})


def test_a_list_as_task_is_a_config_error(capsys):
    assert main(["train", "task=[1]", "--print-config"]) == 2
    assert "task=[1]; valid choices: 'lm', 'seq2seq'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ resuming a changed config


def _metrics(tmp_path):
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_resume_reports_each_changed_key_and_what_the_schedule_does(tmp_path, capsys):
    common = ["train.schedule=linear", "log.checkpoint_every=4"]
    train(_config(tmp_path, *common, "train.steps=4"))
    assert "differs" not in capsys.readouterr().err
    train(_config(tmp_path, *common, "train.steps=10", "train.lr=5e-4", "log.eval_every=5",
                  "train.betas=[0.8, 0.9]", "log.progress=true"))
    err = capsys.readouterr().err
    assert "resuming" in err and "at step 4 with a config that differs from its checkpoint's" in err
    assert "train.lr: 0.001 -> 0.0005: the new peak learning rate, from step 5" in err
    assert "train.steps: 4 -> 10: the run now ends at step 10 (6 steps to go)" in err
    assert "log.eval_every: 4 -> 5: the new cadence applies from step 5" in err
    assert ("train.betas: [0.9, 0.98] -> [0.8, 0.9]: AdamW uses the new value from step 5; its moment estimates carry "
            "over") in err
    assert "log.progress" not in err  # changes nothing trained
    assert ("learning-rate schedule re-planned (linear, peak lr 0.0005, 2 warmup steps, decaying to 0 x lr at step "
            "10); the scheduler resumes at step 4 of the new plan: lr 0.000375 for step 5 (the checkpoint's plan: 0)"
            in err)
    lr = {r["step"]: r["lr"] for r in _metrics(tmp_path) if "lr" in r}
    assert lr[5] == pytest.approx(5e-4 * (1 - 3 / 8))  # the new plan, from the resumed step
    assert [r["step"] for r in _metrics(tmp_path) if "val_loss" in r] == [4, 5, 10]
    state = json.loads((tmp_path / "run" / "step_0000010" / "train_state.json").read_text())
    assert all(group["betas"] == [0.8, 0.9] for group in state["optimizer"]["param_groups"])


def test_resume_with_the_same_config_says_nothing(tmp_path, capsys):
    config = _config(tmp_path, "train.steps=6", "log.checkpoint_every=3")
    train(config, stop_at=4)
    capsys.readouterr()
    assert train(config).steps == 6
    assert "differs" not in capsys.readouterr().err


def test_a_new_schedule_takes_over_at_the_resumed_step(tmp_path, capsys):
    train(_config(tmp_path, "train.schedule=linear", "train.steps=10", "log.checkpoint_every=4"), stop_at=4)
    train(_config(tmp_path, "train.schedule=constant", "train.steps=10", "log.checkpoint_every=4"))
    assert "train.schedule: 'linear' -> 'constant': the new schedule takes over from step 5" in capsys.readouterr().err
    lr = {r["step"]: r["lr"] for r in _metrics(tmp_path) if "lr" in r}
    assert lr[4] < 1e-3 and all(lr[s] == pytest.approx(1e-3) for s in range(5, 11))


def test_resume_with_fewer_steps_than_done_says_nothing_is_left(tmp_path, capsys):
    train(_config(tmp_path, "train.steps=4"))
    capsys.readouterr()
    assert train(_config(tmp_path, "train.steps=3")).steps == 4
    assert "the checkpoint is at step 4 already: nothing is left to train" in capsys.readouterr().err


def test_resume_false_removes_the_previous_runs_checkpoints_before_its_first_step(tmp_path, capsys):
    # the old run's latest.json left in place would let a later resume=true pick up the old run after the new
    # one was killed before its first checkpoint, and rotation (by step name) would keep the old run's higher steps
    train(_config(tmp_path, "train.steps=6", "log.checkpoint_every=2", "log.keep_checkpoints=3"))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000006"]
    capsys.readouterr()
    train(_config(tmp_path, "train.steps=4", "log.checkpoint_every=3", "resume=false"), stop_at=1)  # killed at step 1
    err = capsys.readouterr().err
    assert f"starting over in {run} (resume=false): the previous run's checkpoints (the newest at step 6)" in err
    assert not (run / "latest.json").exists() and not (run / "model.safetensors").exists()
    assert not list(run.glob("step_*")) and not list(run.glob(".*.tmp"))
    result = train(_config(tmp_path, "train.steps=4", "log.checkpoint_every=1", "log.keep_checkpoints=2"))
    assert result.steps == 4 and "starting over" not in capsys.readouterr().err  # nothing left to remove
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert [r["step"] for r in _metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]


def test_only_the_main_process_reports(tmp_path, capsys, monkeypatch):
    class OtherRank(Dist):
        @classmethod
        def current(cls):
            return Dist(rank=1, world_size=2, local_rank=1)

    train(_config(tmp_path, "train.steps=2"))
    capsys.readouterr()
    monkeypatch.setattr(train_state, "Dist", OtherRank)
    train(_config(tmp_path, "train.steps=3"))
    assert "differs" not in capsys.readouterr().err


def test_resume_refuses_another_model_before_loading_it(tmp_path):
    train(_config(tmp_path, "train.steps=2"))
    with pytest.raises(ConfigError, match=r"different model \(model.block.placement: 'pre' -> 'sandwich'\)"):
        train(_config(tmp_path, "train.steps=3", "model.block.placement=sandwich"))  # sandwich has more weights
    with pytest.raises(ConfigError, match=r"model.n_layers: 1 -> 2"):
        train(_config(tmp_path, "train.steps=3", "model.n_layers=2"))


def test_an_unreadable_saved_config_is_a_checkpoint_error(tmp_path):
    train(_config(tmp_path, "train.steps=2"))
    (tmp_path / "run" / "step_0000002" / "train_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot resume, the training state is unreadable.*resume=false"):
        check_recipe(_config(tmp_path, "train.steps=3"))


# ------------------------------------------------------------------------------------------ the study's verdict

STUCK = "stuck (near unigram entropy)"


def _row(placement, warmup, loss, status="trained", norm="layernorm"):
    return StudyRow(placement, norm, warmup, loss, loss, status, None, 1.0)


def test_verdict_says_neither_trains_when_the_warmup_arm_is_stuck_too():
    """The issue's case: both arms at the unigram entropy is not 'needs warmup'."""
    lines = verdict([_row("post", 0, 3.251, STUCK), _row("post", 100, 3.251, STUCK)])
    assert len(lines) == 1 and lines[0].startswith("- **post: neither trains at this budget**")
    assert "**post needs warmup**" not in lines[0] and "3.251 without warmup" in lines[0]


def test_verdict_needs_a_trained_warmup_arm():
    lines = verdict([
        _row("pre", 0, 2.43), _row("pre", 100, 3.20, STUCK),  # no warmup trains, the warmup arm did not
        _row("post", 0, 3.15, STUCK), _row("post", 100, 2.45),  # only the warmup arm trains: needs warmup
        _row("deepnorm", 0, float("nan"), "diverged at step 3"), _row("deepnorm", 100, 3.25, STUCK),
    ])
    assert lines[0].startswith("- **pre trains without warmup**")
    assert "the warmup run did not train at this budget: layernorm: 3.200" in lines[0]
    assert lines[1].startswith("- **post needs warmup**: layernorm: 3.150 without warmup")
    assert lines[2].startswith("- **deepnorm: neither trains at this budget**") and "diverged at step 3" in lines[2]


def test_verdict_with_several_norms_names_each_finding():
    lines = verdict([
        _row("post", 0, 3.2, STUCK), _row("post", 100, 2.5),
        _row("post", 0, 3.2, STUCK, "rmsnorm"), _row("post", 100, 3.2, STUCK, "rmsnorm"),
        _row("pre", 0, 2.4), _row("pre", 100, 2.4),
        _row("pre", 0, 3.3, STUCK, "rmsnorm"), _row("pre", 100, 3.3, STUCK, "rmsnorm"),
    ])
    assert lines[0].startswith("- **post needs warmup**: layernorm: 3.200 without warmup")
    assert "neither trains at this budget with rmsnorm" in lines[0]
    assert lines[1].startswith("- **pre trains without warmup** with layernorm")
    assert "neither trains at this budget with rmsnorm" in lines[1]


def test_a_run_trained_when_it_ends_clearly_below_the_unigram_entropy():
    entropy = 3.26
    assert arm_status(2.5, entropy) == "trained"
    assert arm_status(3.251, entropy) == STUCK  # the numbers: at the entropy, not trained
    assert arm_status(entropy - 0.15, entropy) == "trained" and arm_status(entropy - 0.149, entropy) == STUCK
    assert arm_status(float("nan"), entropy).startswith("diverged")
