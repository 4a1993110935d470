"""Every saveable class keeps one frozen spec whose fields are exactly its constructor's arguments."""

import dataclasses
import inspect
import json

import pytest

import tformer
from tformer.checkpoint import SAVEABLE, SPECS, build_model, model_description

CFG = tformer.BlockConfig(d_model=8, n_heads=2, d_ff=16, norm="rmsnorm", placement="sandwich", bias=False, ffn_bias=True)

BUILT = {
    "LanguageModel": lambda: tformer.LanguageModel(CFG, 2, 30, 10, placements=["post", "pre"]),
    "EncoderDecoder": lambda: tformer.EncoderDecoder(CFG, 1, 2, 30, max_seq_len=10, decoder_placements=["pre", "post"]),
    "EncoderModel": lambda: tformer.EncoderModel(CFG, 2, 30, 10, n_token_types=2, embed_norm=True, final_norm=False),
    "Encoder": lambda: tformer.Encoder(CFG, 2, final_norm=False, n_decoder_layers=3, rope=True),
    "Decoder": lambda: tformer.Decoder(CFG, 2, cross_attention=False, causal=False, final_norm=True),
    "EncoderBlock": lambda: tformer.EncoderBlock(CFG, layer=tformer.LayerContext("encoder", 1, 3)),
    "DecoderBlock": lambda: tformer.DecoderBlock(CFG, False, causal=False),
}


@pytest.mark.parametrize("name", list(SAVEABLE))
def test_spec_fields_are_the_constructor_arguments(name):
    """The guard against drift: a constructor argument without a spec field (or the reverse) fails here."""
    params = [p for p in inspect.signature(SAVEABLE[name].__init__).parameters if p != "self"]
    fields = [f.name for f in dataclasses.fields(SPECS[name])]
    parts = {"attn", "cross_attn", "ffn", "attn_residual", "cross_attn_residual", "ffn_residual"}  # not serializable
    assert sorted(set(params) - parts) == sorted(fields)


@pytest.mark.parametrize("name", list(BUILT))
def test_spec_round_trips_through_json_and_rebuilds_the_same_model(name):
    model = BUILT[name]()
    assert dataclasses.is_dataclass(model.spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.spec.cfg = None
    description = json.loads(json.dumps(model_description(model)))
    rebuilt = build_model(description)
    assert rebuilt.spec == model.spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_block_config_is_frozen_and_shared_by_every_layer():
    encoder = tformer.Encoder(CFG, 3)
    assert all(block.cfg is CFG for block in encoder.layers)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.d_model = 16
    variant = dataclasses.replace(CFG, placement="post")
    assert variant.placement == "post" and CFG.placement == "sandwich"
