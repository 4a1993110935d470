import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tformer
from tformer import ConfigError
from tformer.cli import main
from tformer.recipe_config import load_config
from tformer.training import TrainingDiverged, recipe_defaults, train
from tformer.training.tasks import LanguageModelTask

ROOT = Path(__file__).resolve().parent.parent

TINY_LM = [
    "model.n_layers=2", "model.max_seq_len=32", "model.block.d_model=32", "model.block.n_heads=2",
    "model.block.d_ff=64", "data.seq_len=32", "data.eval_windows=8", "train.batch_size=4",
    "train.warmup_steps=2", "log.every=1", "log.eval_every=4", "log.progress=false",
]


def lm_config(tmp_path, *extra, run="run"):
    return load_config(recipe_defaults("lm"), None, [*TINY_LM, f"out_dir={tmp_path}", f"run={run}", *extra])


def test_config_errors_name_the_key_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(recipe_defaults("lm"), None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.steps='many' must be an integer"):
        load_config(recipe_defaults("lm"), None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(recipe_defaults("lm"), None, ["train.steps"])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("model:\n  block:\n    placment: post\n")
    with pytest.raises(ConfigError, match=r"'model.block.placment' \(did you mean 'placement'\?\)"):
        load_config(recipe_defaults("lm"), config_file)
    config = load_config(recipe_defaults("lm"), None, ["train.lr=3e-4", "train.betas=[0.9, 0.95]"])
    assert config["train"]["lr"] == 3e-4 and config["train"]["betas"] == [0.9, 0.95]
    assert "python_docs" == config["data"]["path"]
    with pytest.raises(ConfigError, match="task='translate'"):
        recipe_defaults("translate")


@pytest.mark.parametrize("args, message", [
    (["model.block.norm=groupnorm"], "norm='groupnorm' is not a known norm"),
    (["data.path=/nonexistent/corpus.txt"], "no such file"),
    (["train.schedule=cosine", "train.steps=5", "train.warmup_steps=10"],
     "train.steps=5 must be greater than train.warmup_steps=10"),
    (["train.lrr=1"], "did you mean 'lr'"),
])
def test_cli_stops_before_training_with_a_clear_message(tmp_path, capsys, args, message):
    code = main(["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=3", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_lm_training_lowers_validation_loss_and_writes_everything(tmp_path):
    result = train(lm_config(tmp_path, "train.steps=40", "train.lr=3e-3", "log.checkpoint_every=20"))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert all({"lr", "grad_norm", "tokens_per_s"} <= set(r) for r in train_rows)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 4 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert result.final["val_ppl"] == pytest.approx(2.718281828 ** result.final["val_loss"], rel=1e-6)
    assert json.loads((run / "latest.json").read_text()) == {"step": 40, "dir": "step_0000040"}
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000020", "step_0000040"]
    model = tformer.load(run / "model.safetensors")
    assert isinstance(model, tformer.LanguageModel)
    assert (run / "config.yaml").read_text().startswith("task: lm")


@pytest.mark.parametrize("task", ["lm", "seq2seq"])
def test_exact_resume_is_bitwise(tmp_path, task):
    """Interrupted after step 8 (last checkpoint at 5), resumed to 12: the same weights as a straight run."""
    if task == "lm":
        common = [*TINY_LM, "model.block.dropout=0.1", "model.block.norm=powernorm",
                  "model.block.norm_options={warmup_iters: 3}"]
    else:
        common = ["model.block.d_model=32", "model.block.n_heads=2", "model.block.d_ff=64", "model.block.dropout=0.1",
                  "train.batch_size=8", "data.eval_examples=8", "log.every=1", "log.eval_every=5",
                  "log.progress=false", "train.warmup_steps=3"]
    common += ["train.schedule=cosine", "train.steps=12", "log.checkpoint_every=5", f"out_dir={tmp_path}"]
    defaults = recipe_defaults(task)
    train(load_config(defaults, None, [*common, "run=straight"]))
    interrupted = train(load_config(defaults, None, [*common, "run=stopped"]), stop_at=8)
    assert interrupted.steps == 8
    assert json.loads((tmp_path / "stopped" / "latest.json").read_text())["step"] == 5
    resumed = train(load_config(defaults, None, [*common, "run=stopped"]))
    assert resumed.steps == 12
    a = tformer.load(tmp_path / "straight" / "model.safetensors").state_dict()
    b = tformer.load(tmp_path / "stopped" / "model.safetensors").state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    stopped = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]

    def without_speed(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]

    assert without_speed(straight) == without_speed(stopped)


def test_resume_with_more_steps_replans_the_schedule(tmp_path):
    common = [*TINY_LM, "train.schedule=linear", "train.warmup_steps=2", "log.checkpoint_every=4", f"out_dir={tmp_path}"]
    train(load_config(recipe_defaults("lm"), None, [*common, "train.steps=4"]))
    result = train(load_config(recipe_defaults("lm"), None, [*common, "train.steps=10"]))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    lr = {r["step"]: r["lr"] for r in rows}
    assert lr[4] == pytest.approx(0.0)  # the first session decayed to 0 at its own end
    assert lr[5] == pytest.approx(1e-3 * (1 - 3 / 8))  # the resumed one follows a 10-step linear decay
    assert result.steps == 10


def test_nan_stops_with_step_and_layer_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original_loss = LanguageModelTask.loss

    def poisoned_loss(self, model, batch):
        calls["n"] += model.training
        if calls["n"] >= 6:  # from the 6th training step on, layer 1's feed-forward returns NaN
            ffn = model.decoder.layers[1].ffn
            handle = ffn.register_forward_hook(lambda m, i, out: out * float("nan"))
            try:
                return original_loss(self, model, batch)
            finally:
                handle.remove()
        return original_loss(self, model, batch)

    monkeypatch.setattr(LanguageModelTask, "loss", poisoned_loss)
    with pytest.raises(TrainingDiverged) as info:
        train(lm_config(tmp_path, "train.steps=20", "log.checkpoint_every=4"))
    message = str(info.value)
    assert "training diverged at step 6: loss is nan" in message
    assert "first non-finite output comes from decoder.layers.1" in message
    assert "gradients first go non-finite at decoder.final_norm" in message
    assert "decoder.layers.1, decoder.layers.0, embedding" in message
    assert "last good checkpoint is kept" in message
    run = tmp_path / "run"
    assert json.loads((run / "latest.json").read_text())["step"] == 4
    model = tformer.load(run / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_seq2seq_learns_to_reverse(tmp_path):
    config = load_config(recipe_defaults("seq2seq"), ROOT / "recipes" / "configs" / "seq2seq_reverse.yaml",
                         [f"out_dir={tmp_path}", "log.progress=false", "train.steps=300", "data.max_len=8"])
    result = train(config)
    assert result.final["exact_match"] > 0.5
    assert isinstance(tformer.load(tmp_path / "seq2seq_reverse"/ "model.safetensors"), tformer.EncoderDecoder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    args = [*TINY_LM, "train.steps=6", "train.batch_size=8", "log.eval_every=100", "log.checkpoint_every=100",
            f"out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "recipes" / "train_lm.py"), *args, "run=single"],
                   check=True, env=env, capture_output=True, timeout=300)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(ROOT / "recipes" / "train_lm.py"), *args, "run=double"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r["step"] for r in rows if "loss" in r]

    single, single_steps = losses("single")
    double, double_steps = losses("double")
    assert single_steps == double_steps == list(range(1, 7))  # rank 0 alone writes: no duplicated rows
    assert double == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_train_leaves_the_callers_process_group_alone(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train(lm_config(tmp_path, "train.steps=2"))
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


_TRAIN_IN_CALLERS_GROUP = """
import json, sys
import torch, torch.distributed as dist
from tformer.recipe_config import load_config
from tformer.training import recipe_defaults, train
rank, store, overrides = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
train(load_config(recipe_defaults("lm"), None, overrides))
assert dist.is_initialized(), "train() destroyed the caller's process group"
total = torch.ones(1)
dist.all_reduce(total)
assert total.item() == 2
dist.destroy_process_group()
"""


@pytest.mark.parametrize("torchrun_env", [True, False], ids=["torchrun-env", "no-env"])
def test_two_processes_in_the_callers_group_keep_it(tmp_path, torchrun_env):
    """The caller made the group (with or without torchrun's RANK/WORLD_SIZE): train() uses it, rank 0
    alone writes, and the group is still alive afterwards."""
    overrides = json.dumps([*TINY_LM, "train.steps=3", "train.batch_size=8", "log.eval_every=100",
                            "log.checkpoint_every=100", f"out_dir={tmp_path}"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    procs = []
    for rank in (0, 1):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"} if torchrun_env else env
        procs.append(subprocess.Popen([sys.executable, "-c", _TRAIN_IN_CALLERS_GROUP, str(rank),
                                       str(tmp_path / "store"), overrides],
                                      env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_damaged_training_state_is_a_clear_error(tmp_path, capsys):
    args = ["train", *TINY_LM, f"out_dir={tmp_path}", "train.steps=4", "log.checkpoint_every=2"]
    assert main(args) == 0
    capsys.readouterr()
    (tmp_path / "run" / "step_0000004" / "train_state.safetensors").write_bytes(b"garbage!")
    assert main([*args[:-2], "train.steps=6", "log.checkpoint_every=2"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "resume=false" in err
    (tmp_path / "run" / "step_0000004" / "model.safetensors").write_bytes(b"")
    assert main([*args[:-2], "train.steps=6"]) == 2
    assert "model.safetensors: the file is empty" in capsys.readouterr().err


def test_init_from_fine_tunes_a_saved_model_with_another_placement(tmp_path):
    """model.init_from starts from a checkpoint (e.g. a pre-trained model switched to sandwich): its
    architecture and weights; with lr=0 the trained weights are exactly the checkpoint's."""
    torch.manual_seed(0)
    base = tformer.LanguageModel(tformer.BlockConfig(d_model=32, n_heads=2, d_ff=64), 2, 256, 32)
    start = tformer.save(tformer.with_placement(base, "sandwich"), tmp_path / "start.safetensors")
    overrides = [*TINY_LM, f"model.init_from={start}", f"out_dir={tmp_path}", "train.steps=2", "train.lr=0"]
    train(load_config(recipe_defaults("lm"), None, overrides), progress=False)
    trained = tformer.load(tmp_path / "run" / "model.safetensors")
    assert trained.spec.cfg.placement == "sandwich"
    for name, tensor in tformer.load(start).state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    missing = [*TINY_LM, f"model.init_from={tmp_path / 'nope.safetensors'}", f"out_dir={tmp_path}"]
    with pytest.raises(tformer.CheckpointError, match="nope.safetensors: no such file"):
        train(load_config(recipe_defaults("lm"), None, missing), progress=False)


def test_a_run_saved_before_new_config_keys_existed_still_resumes(tmp_path):
    """Keys added to the schema later (model.init_from, block.n_kv_heads, ...) take their defaults on resume."""
    config = load_config(recipe_defaults("lm"), None, [*TINY_LM, f"out_dir={tmp_path}", "train.steps=2"])
    train(config, progress=False)
    run = tmp_path / "run"
    step_dir = run / json.loads((run / "latest.json").read_text())["dir"]
    state = json.loads((step_dir / "train_state.json").read_text())
    del state["config"]["model"]["init_from"], state["config"]["model"]["block"]["n_kv_heads"]
    (step_dir / "train_state.json").write_text(json.dumps(state))
    longer = load_config(recipe_defaults("lm"), None, [*TINY_LM, f"out_dir={tmp_path}", "train.steps=3"])
    assert train(longer, progress=False).steps == 3
