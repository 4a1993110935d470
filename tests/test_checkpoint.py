import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import tformer
from tformer import BlockConfig, CheckpointError, load, save
from tformer.checkpoint import model_description

CFG = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm="powernorm", placement="sandwich",
                  norm_options={"warmup_iters": 1})

MODELS = {
    "LanguageModel": lambda: tformer.LanguageModel(CFG, 2, 40, 12, positions="sinusoidal", placements=["post", "pre"]),
    "EncoderDecoder": lambda: tformer.EncoderDecoder(CFG, 2, 1, 40, max_seq_len=12, tie_embeddings=False),
    "Encoder": lambda: tformer.Encoder(CFG, 2),
    "Decoder": lambda: tformer.Decoder(CFG, 2, cross_attention=False, n_encoder_layers=3),
    "EncoderBlock": lambda: tformer.EncoderBlock(CFG, layer=tformer.LayerContext("encoder", 1, 4, 2)),
    "DecoderBlock": lambda: tformer.DecoderBlock(CFG, cross_attention=True),
}


def _run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, tformer.LanguageModel):
        return model(torch.randint(0, 40, (2, 6), generator=g))
    if isinstance(model, tformer.EncoderDecoder):
        return model(torch.randint(0, 40, (2, 6), generator=g), torch.randint(0, 40, (2, 5), generator=g))
    x = torch.randn(2, 6, 16, generator=g)
    if isinstance(model, (tformer.DecoderBlock,)):
        return model(x, memory=torch.randn(2, 3, 16, generator=g))
    return model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_rebuilds_class_weights_and_buffers(name, tmp_path):
    model = MODELS[name]()
    _run(model)  # move PowerNorm's running statistics off their initial values
    _run(model, seed=1).sum().backward()
    path = save(model, tmp_path / "m.safetensors", metadata={"note": "hello"})
    loaded = load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert model_description(loaded) == model_description(model)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    model.eval()
    torch.testing.assert_close(_run(loaded, 2), _run(model, 2), rtol=0, atol=0)
    assert tformer.read_metadata(path)["user"] == {"note": "hello"}


def test_tied_weights_stay_tied(tmp_path):
    model = tformer.EncoderDecoder(CFG, 1, 1, 40)
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert loaded.head.weight is loaded.src_embedding.tokens.weight is loaded.tgt_embedding.tokens.weight
    aliases = tformer.read_metadata(path)["aliases"]
    assert set(aliases) == {"tgt_embedding.tokens.weight", "head.weight"}


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = MODELS["Encoder"]()
    save(model, path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("tformer.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(MODELS["Encoder"](), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    load(path)


def test_unsupported_model_type(tmp_path):
    with pytest.raises(TypeError, match="tformer.save writes"):
        save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


@pytest.fixture
def good(tmp_path):
    return save(MODELS["Encoder"](), tmp_path / "good.safetensors")


def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


def test_missing_and_empty(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load(tmp_path)


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated(good, keep):
    data = good.read_bytes()
    good.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match=rf"{good.name}: .*(truncated|too short)"):
        load(good)


def test_not_safetensors(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_text("this is not a checkpoint, just text " * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load(path)


def test_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load(path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "torch.safetensors")
    with pytest.raises(CheckpointError):
        load(tmp_path / "torch.safetensors")
    assert not marker.exists()


def test_no_or_unknown_metadata(tmp_path, good):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="without tformer metadata"):
        load(plain)
    header = _header(good)["__metadata__"]
    tensors = {"w": torch.zeros(2)}
    future = tmp_path / "future.safetensors"
    save_file(tensors, future, metadata={**header, "format_version": "99"})
    with pytest.raises(CheckpointError, match="format version '99' is unknown"):
        load(future)
    alien = tmp_path / "alien.safetensors"
    save_file(tensors, alien, metadata={**header, "model": json.dumps({"class": "GPT5", "spec": {}})})
    with pytest.raises(CheckpointError, match="unknown model class 'GPT5'"):
        load(alien)
    broken = tmp_path / "broken.safetensors"
    description = json.loads(header["model"])
    description["spec"]["cfg"]["norm"] = "groupnorm"
    save_file(tensors, broken, metadata={**header, "model": json.dumps(description)})
    with pytest.raises(CheckpointError, match="config does not build a Encoder.*norm='groupnorm'"):
        load(broken)


def test_tensor_missing_or_wrong_shape(tmp_path, good):
    metadata = _header(good)["__metadata__"]
    state = MODELS["Encoder"]().state_dict()
    missing = dict(state)
    missing.pop("layers.1.ffn.w2.weight")
    save_file(missing, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="'layers.1.ffn.w2.weight' is missing"):
        load(tmp_path / "missing.safetensors")
    wrong = dict(state)
    wrong["layers.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(wrong, tmp_path / "wrong.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"'layers.0.attn.qkv.weight' has shape \(3, 3\), the config expects \(48, 16\)"):
        load(tmp_path / "wrong.safetensors")
    extra = dict(state, bogus=torch.zeros(1))
    save_file(extra, tmp_path / "extra.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="'bogus' is not part of"):
        load(tmp_path / "extra.safetensors")


# ----------------------------------------------------------------- format 1 (before specs) still loads

V1 = os.path.join(os.path.dirname(__file__), "data", "format_v1")


def _v1_inputs(name, stored):
    inputs = torch.tensor(stored["input"])
    if name == "lm":
        return lambda m: m(inputs)
    if name == "encdec":
        return lambda m: m(inputs, inputs)
    if name == "decoder_block":
        return lambda m: m(inputs, memory=inputs)
    return lambda m: m(inputs)


@pytest.mark.parametrize("name", ["lm", "encdec", "encoder", "decoder", "encoder_block", "decoder_block"])
def test_format_1_checkpoints_written_before_the_redesign_load_with_the_same_outputs(name):
    """Fixtures written by tformer at commit a61a88f (tests/data/format_v1/make_fixtures.py)."""
    path = os.path.join(V1, f"{name}.safetensors")
    assert tformer.read_metadata(path)["format_version"] == "1"
    with open(os.path.join(V1, "expected_outputs.json")) as f:
        stored = json.load(f)[name]
    model = load(path)
    with torch.no_grad():
        out = _v1_inputs(name, stored)(model)
    torch.testing.assert_close(out, torch.tensor(stored["output"]), rtol=0, atol=1e-5)


def test_format_1_powernorm_keeps_its_single_group():
    """Format 1 blocks ran PowerNorm with one group; blocks now default to one per head, so the loader pins 1."""
    model = load(os.path.join(V1, "encoder.safetensors"))
    assert {m.group_num for m in model.modules() if isinstance(m, tformer.powernorm.PowerNorm)} == {1}
    fresh = tformer.Encoder(model.cfg.__class__(**{**model.cfg.__dict__, "norm_options": {"warmup_iters": 2}}), 2)
    assert {m.group_num for m in fresh.modules() if isinstance(m, tformer.powernorm.PowerNorm)} == {2}  # n_heads


def test_saving_writes_format_2_and_resaving_a_format_1_model_upgrades_it(tmp_path):
    model = load(os.path.join(V1, "lm.safetensors"))
    path = save(model, tmp_path / "upgraded.safetensors")
    meta = tformer.read_metadata(path)
    assert meta["format_version"] == "2" and meta["model"]["spec"]["n_layers"] == 4
    tokens = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(load(path)(tokens), model(tokens), rtol=0, atol=0)


# ----------------------------------------------------------------- one-off norms and parts are not saveable


class OneOffNorm(torch.nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d_model))

    def forward(self, x, padding_mask=None):
        return self.weight * x / x.norm(dim=-1, keepdim=True)


def test_unregistered_norm_or_placement_or_part_is_refused_with_what_to_do(tmp_path):
    cfg = BlockConfig(d_model=8, n_heads=2, d_ff=16, norm=OneOffNorm)
    with pytest.raises(CheckpointError, match=r"norm='OneOffNorm'.*register.*NORMS\.register"):
        save(tformer.Encoder(cfg, 1), tmp_path / "a.safetensors")
    placement = tformer.hyper_connections(2, dynamic=False)
    with pytest.raises(CheckpointError, match="placement=.*register"):
        save(tformer.Encoder(BlockConfig(d_model=8, n_heads=2, d_ff=16, placement=placement), 1), tmp_path / "b.safetensors")
    block = tformer.EncoderBlock(BlockConfig(d_model=8, n_heads=2, d_ff=16), ffn=torch.nn.Linear(8, 8))
    with pytest.raises(CheckpointError, match="parts passed in"):
        save(block, tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())
