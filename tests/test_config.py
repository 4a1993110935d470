import dataclasses
import inspect
import json

import pytest

import tformer
from tformer import BlockConfig, ConfigError

#: The BlockConfig fields whose values are names in a registry.
REGISTRY_FIELDS = {"norm": tformer.NORMS, "placement": tformer.PLACEMENTS, "activation": tformer.ACTIVATIONS,
                   "attention": tformer.BACKENDS, "init": tformer.INIT_SCHEMES}


def test_defaults_and_registered_names():
    cfg = BlockConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.norm, cfg.placement) == (512, 8, 2048, "layernorm", "pre")
    assert {"layernorm", "rmsnorm", "powernorm", "dyt", "none"} <= set(tformer.NORMS)
    assert {"pre", "post", "sandwich", "deepnorm"} <= set(tformer.PLACEMENTS)
    assert len(set(tformer.PLACEMENTS) - {"pre", "post", "sandwich", "deepnorm"}) >= 2
    assert issubclass(ConfigError, ValueError)


def test_json_round_trip():
    cfg = BlockConfig(d_model=64, n_heads=4, d_ff=256, norm="powernorm", placement="sandwich",
                      activation="swiglu", dropout=0.1, attn_dropout=0.05, bias=False, norm_eps=1e-6,
                      attention="sdpa", qk_norm=True, init="gpt2", norm_options={"warmup_iters": 50})
    rebuilt = BlockConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert rebuilt == cfg


@pytest.mark.parametrize("field, name", [(f, n) for f, registry in REGISTRY_FIELDS.items() for n in registry])
def test_every_registered_name_is_accepted_and_round_trips(field, name):
    """Each registered norm, placement, activation, backend and init scheme is a valid config value that
    survives JSON (what checkpoints store)."""
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, **{field: name})
    assert getattr(cfg, field) == name and cfg.is_serializable
    assert BlockConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("norm", list(tformer.NORMS))
def test_norm_options_are_the_norms_constructor_options(norm):
    """``norm_options`` accepts exactly the norm's own constructor options (beyond d_model, eps, bias): each
    default value round-trips, and an unknown key is rejected with the valid options listed."""
    params = inspect.signature(tformer.NORMS[norm]).parameters
    options = {k: p.default for k, p in params.items() if k not in ("d_model", "eps", "bias")
               and p.default is not inspect.Parameter.empty}
    cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm=norm, norm_options=options)
    assert BlockConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ConfigError) as info:
        BlockConfig(d_model=16, n_heads=2, d_ff=32, norm=norm, norm_options={"no_such_option": 1})
    message = str(info.value)
    assert "no_such_option" in message and all(name in message for name in options)


@pytest.mark.parametrize("placement", [None, "deepnorm"])
def test_deepnorm_shorthand(placement):
    cfg = BlockConfig(d_model=64, n_heads=4, norm="deepnorm", placement=placement)
    assert (cfg.norm, cfg.placement) == ("layernorm", "deepnorm")
    assert BlockConfig(**dataclasses.asdict(cfg)) == cfg


def test_deepnorm_shorthand_conflict_says_what_to_write():
    with pytest.raises(ConfigError) as info:
        BlockConfig(d_model=64, n_heads=4, norm="deepnorm", placement="post")
    message = str(info.value)
    assert "placement='post'" in message and "norm='layernorm', placement='deepnorm'" in message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        *[(field, "no-such-entry", [f"{field}=", *(repr(n) for n in registry)]) for field, registry in REGISTRY_FIELDS.items()],
        ("dropout", -0.1, ["dropout=", "[0, 1)"]),
        ("attn_dropout", 1.0, ["attn_dropout=", "[0, 1)"]),
        ("d_model", 0, ["d_model="]),
        ("n_heads", -2, ["n_heads="]),
        ("d_ff", 3.5, ["d_ff="]),
        ("d_model", True, ["d_model="]),
        ("norm_eps", 0.0, ["norm_eps="]),
        ("norm_eps", float("nan"), ["norm_eps="]),
        ("bias", "yes", ["bias="]),
        ("qk_norm", 1, ["qk_norm="]),
        ("norm_options", {"warmup": 3}, ["norm_options=", "warmup_iters"]),
        ("norm_options", [1], ["norm_options="]),
    ],
)
def test_invalid_values_name_field_and_choices(field, value, expected):
    kwargs = dict(d_model=64, n_heads=4, d_ff=128, norm="powernorm" if field == "norm_options" else "layernorm")
    kwargs[field] = value
    with pytest.raises(ConfigError) as info:
        BlockConfig(**kwargs)
    for fragment in expected:
        assert fragment in str(info.value)


def test_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match=r"d_model=100 is not divisible by n_heads=8"):
        BlockConfig(d_model=100, n_heads=8)


def test_replace_revalidates():
    cfg = BlockConfig(d_model=64, n_heads=4)
    with pytest.raises(ConfigError, match="placement="):
        dataclasses.replace(cfg, placement="nope")
    assert dataclasses.replace(cfg, placement="post").placement == "post"
