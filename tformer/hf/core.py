"""The machinery every Hugging Face family shares: weight links, the family protocol, ``from_hf`` and ``to_hf``.

A family (``gpt2.py``, ``llama.py``, ...) says three things: which tformer model a Hugging Face config
describes (refusing what tformer cannot compute exactly), which Hugging Face config a tformer model
describes (refusing, field by field, what the Hugging Face class cannot express), and how the
weights correspond (``Link``). The copying, the tied heads, the embedding scale and the checks that
no weight is left behind live here once.

``transformers`` is imported only inside the functions, so ``import tformer`` works without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import BlockConfig
from ..errors import ConfigError
from ..models import EncoderModel, LanguageModel

INSTALL_HINT = 'pip install "tformer[hf]"'


def import_transformers():
    """The ``transformers`` module, or an ``ImportError`` that says how to install it."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised without the extra
        raise ImportError(f"tformer.from_hf / tformer.to_hf need Hugging Face transformers: {INSTALL_HINT}") from error
    return transformers


@dataclass(frozen=True)
class Link:
    """One tformer tensor and the Hugging Face tensors it is made of.

    Hugging Face -> tformer: the ``hf`` tensors, each transposed first when ``transposed`` (GPT-2's
    ``Conv1D`` stores ``(in, out)``), concatenated along rows (separate q/k/v projections -> the
    fused ``qkv``). tformer -> Hugging Face: split along rows into the Hugging Face sizes, transposed back.
    """

    tformer: str
    hf: tuple[str, ...]
    transposed: bool = False


def linear_links(tformer: str, hf: str | tuple[str, ...], bias: bool, transposed: bool = False) -> list[Link]:
    """Links for a linear layer's ``weight`` (and ``bias`` when it has one)."""
    hf = (hf,) if isinstance(hf, str) else hf
    links = [Link(f"{tformer}.weight", tuple(f"{h}.weight" for h in hf), transposed)]
    if bias:
        links.append(Link(f"{tformer}.bias", tuple(f"{h}.bias" for h in hf), transposed))
    return links


def norm_links(tformer: str, hf: str, bias: bool) -> list[Link]:
    """Links for a norm's gain (and shift)."""
    return linear_links(tformer, hf, bias)


@dataclass
class HFOrigin:
    """What ``from_hf`` keeps of the source model beyond the tformer spec, for ``to_hf``.

    ``config``: a copy of the Hugging Face config (token ids, names and other fields that do not change
    the computation are written back from it). ``extra_weights``: Hugging Face weights outside what the
    tformer model computes (BERT's pooler), restored by ``to_hf``. ``generation_config``: the source's
    generation defaults (a causal LM's ``eos_token_id`` / ``pad_token_id`` also go to the tformer model,
    whose ``generate`` then ends rows as Hugging Face's does).
    """

    config: object
    extra_weights: dict[str, Tensor] = field(default_factory=dict)
    generation_config: object = None


# ---------------------------------------------------------------------------------------------- checks


def refuse(family: Family, field_name: str, value, needs: str) -> ConfigError:
    """The ``to_hf`` refusal: the first field the Hugging Face class has no equivalent for."""
    return ConfigError(
        f"to_hf: {field_name}={value!r} has no equivalent in Hugging Face's {family.hf_class} ({family.title}), "
        f"which needs {needs}. {SUPPORTED_TO_HF}"
    )


def refuse_hf(family: Family, option: str, value, why: str) -> ConfigError:
    """The ``from_hf`` refusal: a Hugging Face option tformer does not compute."""
    return ConfigError(f"from_hf: {family.hf_class} with {option}={value!r} is not supported: {why}")


SUPPORTED_TO_HF = (
    "to_hf writes GPT2LMHeadModel (LanguageModel, layernorm, pre, learned positions), LlamaForCausalLM "
    "(LanguageModel, rmsnorm, pre, rope, swiglu/geglu/geglu_tanh), Olmo2ForCausalLM (LanguageModel, rmsnorm, output, "
    "rope, qk_norm='full', swiglu/geglu/geglu_tanh), Gemma2ForCausalLM (LanguageModel, rmsnorm with "
    "norm_options={'unit_offset': True}, sandwich, rope, geglu_tanh/geglu, init='xavier') and BertModel "
    "(EncoderModel, layernorm, post, learned positions, embed_norm)."
)


@dataclass(frozen=True)
class Needs:
    """What a family's Hugging Face class needs of a tformer model (``check_model`` checks it in field order)."""

    model_class: type
    norm: str
    placement: str
    activations: dict  # tformer activation -> Hugging Face activation name
    norm_bias: bool | None  # None: the norm has no bias (RMSNorm), nothing to check
    attn_bias: bool | None  # None: either
    ffn_bias: bool | None
    qk_norm: bool | str
    gqa: bool
    positions: str
    norm_options: dict = field(default_factory=dict)
    head_dim: bool = False  # whether the class has heads of any width (else d_model / n_heads)
    attn_scale: bool = False  # whether it scales q k^T by anything but head_dim ** -0.5
    softcaps: bool = False  # whether it soft-caps attention scores and final logits
    embed_scale: str = "one"  # what the class multiplies token embeddings by: "one" or "sqrt_d"


def check_model(family: Family, model: nn.Module, needs: Needs) -> None:
    """Raise ``ConfigError`` naming the first field of ``model`` the family's Hugging Face class cannot express."""
    if type(model) is not needs.model_class:
        raise refuse(family, "model", type(model).__name__, f"a tformer.{needs.model_class.__name__}")
    cfg: BlockConfig = model.cfg
    if cfg.norm != needs.norm:
        raise refuse(family, "norm", cfg.norm, f"norm={needs.norm!r}")
    for placement in (cfg.placement, *(model.spec.placements or ())):
        if placement != needs.placement:
            name = "placement" if placement == cfg.placement else "placements"
            raise refuse(family, name, placement if name == "placement" else model.spec.placements,
                         f"placement={needs.placement!r} in every layer")
    if cfg.activation not in needs.activations:
        raise refuse(family, "activation", cfg.activation, f"one of {sorted(needs.activations)}")
    if needs.norm_bias is not None and cfg.use_norm_bias != needs.norm_bias:
        raise refuse(family, "norm_bias", cfg.use_norm_bias, f"norm_bias={needs.norm_bias}")
    if needs.attn_bias is not None and cfg.use_attn_bias != needs.attn_bias:
        raise refuse(family, "attn_bias", cfg.use_attn_bias, f"attn_bias={needs.attn_bias}")
    if needs.ffn_bias is not None and cfg.use_ffn_bias != needs.ffn_bias:
        raise refuse(family, "ffn_bias", cfg.use_ffn_bias, f"ffn_bias={needs.ffn_bias}")
    if cfg.norm_options != needs.norm_options:
        raise refuse(family, "norm_options", cfg.norm_options, repr(needs.norm_options) if needs.norm_options else "none")
    if cfg.qk_norm != needs.qk_norm:
        raise refuse(family, "qk_norm", cfg.qk_norm, f"qk_norm={needs.qk_norm!r}")
    if not needs.gqa and cfg.kv_heads != cfg.n_heads:
        raise refuse(family, "n_kv_heads", cfg.n_kv_heads, "as many key/value heads as query heads (n_kv_heads=None)")
    if not needs.head_dim and cfg.head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise refuse(family, "head_dim", cfg.head_dim, f"heads of width d_model / n_heads (head_dim=None)")
    if not needs.attn_scale and cfg.attn_scale is not None and cfg.attn_scale != cfg.head_size**-0.5:
        raise refuse(family, "attn_scale", cfg.attn_scale, "the scale head_dim ** -0.5 (attn_scale=None)")
    if not needs.softcaps and cfg.attn_softcap is not None:
        raise refuse(family, "attn_softcap", cfg.attn_softcap, "no attention soft-capping (attn_softcap=None)")
    if not needs.softcaps and getattr(model.spec, "logit_softcap", None) is not None:
        raise refuse(family, "logit_softcap", model.spec.logit_softcap, "no logit soft-capping (logit_softcap=None)")
    hf_scale = hf_embed_scale(needs, cfg)
    if isinstance(model, LanguageModel) and model.spec.tie_embeddings and model.embedding.scale != hf_scale:
        wanted = "unscaled token embeddings" if hf_scale == 1.0 else f"token embeddings times sqrt(d_model) = {hf_scale:g}"
        init = "init='gpt2'" if hf_scale == 1.0 else "init='xavier'"
        raise refuse(family, "init", cfg.init,
                     f"{wanted} when the head is tied (init={cfg.init!r} multiplies them by "
                     f"{model.embedding.scale:g}; build with {init}, or tie_embeddings=False, where the scale "
                     f"is folded into the exported embedding)")
    if model.spec.positions != needs.positions:
        raise refuse(family, "positions", model.spec.positions, f"positions={needs.positions!r}")
    if getattr(model.spec, "head_bias", False):
        raise refuse(family, "head_bias", True, "an LM head without a bias (head_bias=False)")


def hf_embed_scale(needs: Needs, cfg: BlockConfig) -> float:
    """The factor the Hugging Face class multiplies token embeddings by."""
    return math.sqrt(cfg.d_model) if needs.embed_scale == "sqrt_d" else 1.0


def activation_name(family: Family, mapping: dict, hf_name, option: str = "hidden_act") -> str:
    """The tformer activation for a Hugging Face activation name, or a refusal naming it."""
    if not isinstance(hf_name, str) or hf_name not in mapping:
        raise refuse_hf(family, option, hf_name, f"tformer computes {', '.join(repr(k) for k in mapping)} exactly "
                                                 f"here (as {', '.join(sorted(set(mapping.values())))})")
    return mapping[hf_name]


def kept_activation(origin_config, option: str, mapping: dict, activation: str, default: str) -> str:
    """The Hugging Face name to write for ``activation``: the source model's own when it maps to the same."""
    original = getattr(origin_config, option, None) if origin_config is not None else None
    return original if mapping.get(original) == activation else default


# ---------------------------------------------------------------------------------------------- families


class Family:
    """One Hugging Face architecture: subclasses set the class attributes and the first four methods
    (``build_hf`` and ``complete_hf_state`` have defaults), and are added with ``@register``."""

    key: ClassVar[str] = ""                 # to_hf(model, family=key)
    title: ClassVar[str] = ""               # e.g. "GPT-2"
    hf_class: ClassVar[str] = ""            # the transformers class from_hf takes and to_hf builds
    config_class: ClassVar[str] = ""
    token_embedding: ClassVar[str] = ""     # the Hugging Face key of the token embedding
    head: ClassVar[str | None] = None       # the Hugging Face key of the LM head weight, if any
    extra_prefixes: ClassVar[tuple[str, ...]] = ()  # Hugging Face weights kept aside (BERT's pooler)

    def tformer_model(self, config) -> tuple[type, dict]:
        """``(tformer model class, constructor kwargs)`` for a Hugging Face config; refuses unsupported options."""
        raise NotImplementedError

    def links(self, model: nn.Module) -> list[Link]:
        """How the tformer model's tensors are made of the Hugging Face model's."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Refuse (``ConfigError``) the first field of ``model`` the Hugging Face class cannot express."""
        raise NotImplementedError

    def embed_scale(self, model: nn.Module) -> float:
        """The factor the Hugging Face class multiplies token embeddings by (1 but for Gemma's sqrt(d))."""
        return 1.0

    def hf_config(self, model: nn.Module, origin_config) -> dict:
        """The Hugging Face config fields that describe ``model`` (``origin_config``: the source's, or None)."""
        raise NotImplementedError

    def finish(self, model: nn.Module, config) -> None:
        """Anything beyond the spec and the weights ``from_hf`` sets on the converted model."""

    def build_hf(self, transformers, config, origin: HFOrigin | None):
        return getattr(transformers, self.hf_class)(config)

    def complete_hf_state(self, model: nn.Module, state: dict, hf_state: dict) -> None:
        """Fill Hugging Face tensors the tformer model has no counterpart for (e.g. all-zero token types)."""


FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.key] = cls()
    return cls


def family_of(hf_model) -> Family:
    """The family of a Hugging Face model instance (its class or a base class), or a refusal."""
    by_class = {f.hf_class: f for f in FAMILIES.values()}
    for cls in type(hf_model).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    supported = ", ".join(by_class)
    raise ConfigError(f"from_hf: {type(hf_model).__name__} is not a supported architecture; supported: {supported}")


def _is_tied(hf_model) -> bool:
    out = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    return out is not None and out.weight is hf_model.get_input_embeddings().weight


# ---------------------------------------------------------------------------------------------- from_hf


@torch.no_grad()
def from_hf(hf_model) -> nn.Module:
    """The tformer model equal to a Hugging Face model, holding copies of its weights (see ``tformer.hf``)."""
    family = family_of(hf_model)
    config = hf_model.config
    model_class, kwargs = family.tformer_model(config)
    if model_class is LanguageModel:
        kwargs["tie_embeddings"] = _is_tied(hf_model)
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = model_class(**kwargs)
    hf_state = hf_model.state_dict()
    state, used = {}, set()
    for link in family.links(model):
        missing = [k for k in link.hf if k not in hf_state]
        if missing:
            raise ConfigError(f"from_hf: {family.hf_class} has no weight {missing[0]!r}; is it a modified model?")
        parts = [_hf_layout(hf_state[k], link.transposed) for k in link.hf]
        state[link.tformer] = (torch.cat(parts) if len(parts) > 1 else parts[0]).clone()
        used.update(link.hf)
    if getattr(model.spec, "tie_embeddings", False):
        state["head.weight"] = state["embedding.tokens.weight"]
        used.add(family.head)
    extra = {k: v.clone() for k, v in hf_state.items() if family.extra_prefixes and k.startswith(family.extra_prefixes)}
    left = sorted(set(hf_state) - used - set(extra))
    if left:
        raise ConfigError(f"from_hf: {family.hf_class} holds weights tformer has no place for ({', '.join(left[:3])}"
                          f"{', ...' if len(left) > 3 else ''}); its architecture differs from {family.title}'s")
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(model.spec, "tie_embeddings", False):
        model.head.weight = model.embedding.tokens.weight
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:  # pragma: no cover - a model part without a Hugging Face counterpart
        raise ConfigError(f"from_hf: no Hugging Face weight for {left_on_meta[0]}")
    generation = getattr(hf_model, "generation_config", None)
    if isinstance(model, LanguageModel):  # generate() ends rows where Hugging Face's does
        source = generation if generation is not None else config
        model.eos_token_id = copy.deepcopy(getattr(source, "eos_token_id", None))
        model.pad_token_id = getattr(source, "pad_token_id", None)
    family.finish(model, config)
    model.hf_origin = HFOrigin(copy.deepcopy(config), extra, copy.deepcopy(generation))
    return model.train(hf_model.training)


def _hf_layout(t: Tensor, transposed: bool) -> Tensor:
    return t.t() if transposed and t.dim() == 2 else t


# ---------------------------------------------------------------------------------------------- to_hf


def pick_family(model: nn.Module, family: str | None) -> Family:
    """The family named by ``family``, else the one the model came from, else the one its spec points to."""
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"to_hf: family={family!r} is not known; valid choices: "
                              f"{', '.join(repr(k) for k in FAMILIES)}")
        return FAMILIES[family]
    if isinstance(model, EncoderModel):
        return FAMILIES["bert"]
    if not isinstance(model, LanguageModel):
        raise ConfigError(f"to_hf: model={type(model).__name__!r} has no Hugging Face equivalent here. "
                          f"{SUPPORTED_TO_HF}")
    origin = getattr(model, "hf_origin", None)
    if origin is not None:
        by_config = {f.config_class: f for f in FAMILIES.values()}
        if type(origin.config).__name__ in by_config:
            return by_config[type(origin.config).__name__]
    if model.spec.positions == "rope" and model.cfg.placement == "sandwich":
        return FAMILIES["gemma2"]
    if model.spec.positions == "rope":
        olmo_like = model.cfg.placement == "output" or model.cfg.qk_norm == "full"
        return FAMILIES["olmo2" if olmo_like else "llama"]
    return FAMILIES["gpt2"]


@torch.no_grad()
def to_hf(model: nn.Module, *, family: str | None = None):
    """The Hugging Face model equal to a tformer model (see ``tformer.hf``)."""
    fam = pick_family(model, family)
    fam.check(model)
    transformers = import_transformers()
    origin: HFOrigin | None = getattr(model, "hf_origin", None)
    if origin is not None and type(origin.config).__name__ != fam.config_class:
        origin = None
    fields = fam.hf_config(model, None if origin is None else origin.config)
    if origin is not None:
        config = copy.deepcopy(origin.config)
        for name, value in fields.items():
            setattr(config, name, value)
    else:
        # Hugging Face's default special tokens (Llama's eos=2, ...) would make generate() stop where tformer's
        # does not: only the model's own (LanguageModel.eos_token_id / pad_token_id) are written.
        fields = {"bos_token_id": None, "eos_token_id": getattr(model, "eos_token_id", None),
                  "pad_token_id": getattr(model, "pad_token_id", None), **fields}
        config = getattr(transformers, fam.config_class)(**fields)
    hf_model = fam.build_hf(transformers, config, origin)
    hf_state = hf_model.state_dict()
    source = model.state_dict()
    state = {}
    for link in fam.links(model):
        targets = [_hf_layout(hf_state[k], link.transposed) for k in link.hf]
        pieces = source[link.tformer].split([t.shape[0] for t in targets])
        for key, piece in zip(link.hf, pieces):
            state[key] = _hf_layout(piece, link.transposed)
    scale = getattr(model.embedding, "scale", 1.0) / fam.embed_scale(model)
    if scale != 1.0:  # tformer multiplies token embeddings by its scale, the Hugging Face class by its own
        state[fam.token_embedding] = state[fam.token_embedding] * scale
    if origin is not None:
        state.update({k: v for k, v in origin.extra_weights.items() if k in hf_state})
    fam.complete_hf_state(model, state, hf_state)
    tied = bool(getattr(model.spec, "tie_embeddings", False))
    expected = set(hf_state) - ({fam.head} if tied else set())
    missing, unexpected = expected - set(state), set(state) - set(hf_state)
    if missing or unexpected:  # pragma: no cover - a family's links out of step with transformers
        raise ConfigError(f"to_hf: cannot fill {fam.hf_class}: no tformer tensor for {sorted(missing)[:3]}, "
                          f"no Hugging Face place for {sorted(unexpected)[:3]}")
    dtype = _common_dtype(model)
    hf_model.to(dtype=dtype)
    hf_model.load_state_dict(state, strict=False)
    if tied and hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight:
        raise ConfigError(f"to_hf: {fam.hf_class} did not tie its head to the token embedding")  # pragma: no cover
    if origin is not None and origin.generation_config is not None:
        hf_model.generation_config = copy.deepcopy(origin.generation_config)
    if isinstance(model, LanguageModel) and getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.eos_token_id = copy.deepcopy(model.eos_token_id)
        hf_model.generation_config.pad_token_id = model.pad_token_id
    device = next(model.parameters()).device
    return hf_model.to(device).train(model.training)


def _common_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ConfigError(f"to_hf: the model's parameters have several dtypes ({', '.join(map(str, dtypes))}); "
                          f"call model.to(dtype) first")
    return dtypes.pop()


def rope_base_of(family: Family, config) -> float:
    """The rotary base of a Hugging Face config (transformers 5's ``rope_parameters`` or 4's ``rope_theta``),
    refusing any scaled or partial rotary variant."""
    params = getattr(config, "rope_parameters", None)
    scaling = getattr(config, "rope_scaling", None)
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        partial = params.get("partial_rotary_factor", 1.0)
    else:
        rope_type = (scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default")
        theta, partial = getattr(config, "rope_theta", None), 1.0
    if rope_type != "default":
        raise refuse_hf(family, "rope_scaling" if not params else "rope_parameters['rope_type']", rope_type,
                        "tformer's rotary positions are unscaled (rope_type 'default' only)")
    partial = getattr(config, "partial_rotary_factor", partial)
    if partial not in (None, 1, 1.0):
        raise refuse_hf(family, "partial_rotary_factor", partial, "tformer rotates the whole head")
    if theta is None or not math.isfinite(float(theta)):
        raise refuse_hf(family, "rope_theta", theta, "a finite rotary base is needed")
    return float(theta)


def rope_fields(config_class, base: float) -> dict:
    """The Hugging Face config fields for an unscaled rotary base, in the installed transformers' spelling."""
    if hasattr(config_class(), "rope_parameters"):  # transformers 5; 4 spells it rope_theta + rope_scaling
        return {"rope_parameters": {"rope_type": "default", "rope_theta": base}}
    return {"rope_theta": base, "rope_scaling": None}
