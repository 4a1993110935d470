"""Gemma 2 (``Gemma2ForCausalLM``): sandwich RMSNorm, soft-capping, wide heads, scaled embeddings.

Each sublayer is ``x + RMSNorm_out(F(RMSNorm_in(x)))``: tformer's ``"sandwich"`` placement
(``input_layernorm`` / ``post_attention_layernorm`` around attention, ``pre_feedforward_layernorm`` /
``post_feedforward_layernorm`` around the MLP). What else Gemma 2 computes, and where it goes:

* RMSNorm gains stored as offsets from one, ``(1 + w) * x / rms(x)``: ``norm_options={"unit_offset": True}``,
  so weights load and export bit for bit;
* token embeddings times ``sqrt(hidden_size)``: tformer's ``init="xavier"`` embedding scale (the head,
  tied or not, reads the unscaled weight, as in Gemma);
* ``head_dim`` independent of ``hidden_size / num_attention_heads``: ``BlockConfig.head_dim``;
* ``query_pre_attn_scalar``: ``attn_scale = query_pre_attn_scalar ** -0.5``;
* ``attn_logit_softcapping`` / ``final_logit_softcapping``: ``BlockConfig.attn_softcap`` (the ``math``
  attention backend) / ``LanguageModel(logit_softcap=...)``;
* ``gelu_pytorch_tanh`` gated MLP: ``activation="geglu_tanh"`` (``gelu``: ``"geglu"``).

Sliding-window layers (``layer_types`` "sliding_attention", window ``sliding_window``) attend to the
last ``sliding_window`` positions only. Up to that length the window hides nothing, so the converted
model is exact there and its ``max_seq_len`` is ``min(max_position_embeddings, sliding_window)``: a
longer input (or ``generate`` past it) is refused with an error rather than computed without the window.
"""

from __future__ import annotations

import math

from ..config import BlockConfig
from ..models import LanguageModel
from .core import Needs, activation_name, check_model, kept_activation, norm_links, refuse_hf, register, rope_base_of, \
    rope_fields
from .llama import Llama

#: Gemma's ``hidden_activation`` (a gated MLP) -> tformer's gated activation.
GATED_ACTIVATIONS = {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu"}
TO_HF_GATED = {"geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu"}
UNIT_OFFSET = {"unit_offset": True}
LAYER_TYPES = ("full_attention", "sliding_attention")


def window_limit(config) -> int:
    """The longest input the converted model computes exactly: the sliding window, if any layer has one."""
    limit = config.max_position_embeddings
    layer_types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    if window is not None and "sliding_attention" in layer_types:
        limit = min(limit, window)
    return limit


@register
class Gemma2(Llama):  # Llama's weight layout (links); its own config, norms, checks and Hugging Face fields
    key = "gemma2"
    title = "Gemma 2"
    hf_class = "Gemma2ForCausalLM"
    config_class = "Gemma2Config"
    token_embedding = "model.embed_tokens.weight"
    head = "lm_head.weight"

    def tformer_model(self, config):
        if getattr(config, "use_bidirectional_attention", False):
            raise refuse_hf(self, "use_bidirectional_attention", True, "tformer's LanguageModel is causal")
        unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
        if unknown:
            raise refuse_hf(self, "layer_types", unknown[0], f"tformer computes {LAYER_TYPES}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scalar = config.query_pre_attn_scalar
        if not (isinstance(scalar, (int, float)) and scalar > 0):
            raise refuse_hf(self, "query_pre_attn_scalar", scalar, "a positive number is needed")
        activation = activation_name(self, GATED_ACTIVATIONS, config.hidden_activation, "hidden_activation")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        cfg = BlockConfig(
            d_model=config.hidden_size, n_heads=heads, d_ff=config.intermediate_size,
            norm="rmsnorm", norm_options=dict(UNIT_OFFSET), placement="sandwich", activation=activation,
            dropout=0.0, attn_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
            bias=False, attn_bias=bool(getattr(config, "attention_bias", False)) or None,
            norm_eps=float(config.rms_norm_eps), init="xavier",  # xavier: embeddings times sqrt(d_model)
            n_kv_heads=None if kv_heads == heads else kv_heads, rope_base=rope_base_of(self, config),
            head_dim=None if head_dim * heads == config.hidden_size else head_dim,
            attn_scale=None if scalar == head_dim else float(scalar) ** -0.5,
            attn_softcap=_optional_float(config.attn_logit_softcapping),
        )
        return LanguageModel, dict(cfg=cfg, n_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                                   max_seq_len=window_limit(config), positions="rope",
                                   logit_softcap=_optional_float(config.final_logit_softcapping))

    def finish(self, model, config) -> None:
        limit = window_limit(config)
        if limit < config.max_position_embeddings:
            model.embedding.max_seq_len_reason = (
                f" (Gemma 2's sliding window: its layers of type 'sliding_attention' see only the last "
                f"sliding_window={config.sliding_window} positions, so the converted model computes exactly, and "
                f"accepts, inputs up to that length only)")

    def layer_norm_links(self, t: str, h: str) -> list:
        """Four norms a layer (sandwich): in and out of attention, in and out of the MLP."""
        return (norm_links(f"{t}.attn_residual.norm_in", f"{h}.input_layernorm", bias=False)
                + norm_links(f"{t}.attn_residual.norm_out", f"{h}.post_attention_layernorm", bias=False)
                + norm_links(f"{t}.ffn_residual.norm_in", f"{h}.pre_feedforward_layernorm", bias=False)
                + norm_links(f"{t}.ffn_residual.norm_out", f"{h}.post_feedforward_layernorm", bias=False))

    NEEDS = Needs(model_class=LanguageModel, norm="rmsnorm", placement="sandwich", activations=TO_HF_GATED,
                  norm_bias=None, attn_bias=None, ffn_bias=False, qk_norm=False, gqa=True, positions="rope",
                  norm_options=UNIT_OFFSET, head_dim=True, attn_scale=True, softcaps=True, embed_scale="sqrt_d")

    def check(self, model):
        check_model(self, model, self.NEEDS)

    def embed_scale(self, model) -> float:
        return math.sqrt(model.cfg.d_model)

    def hf_config(self, model, origin_config):
        from .core import import_transformers

        cfg, spec = model.cfg, model.spec
        scalar = cfg.head_size if cfg.attn_scale is None else cfg.attn_scale**-2
        scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-9 * scalar else scalar
        config_class = type(origin_config) if origin_config is not None else getattr(import_transformers(),
                                                                                      self.config_class)
        fields = dict(
            vocab_size=spec.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=spec.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_size, query_pre_attn_scalar=scalar,
            hidden_activation=kept_activation(origin_config, "hidden_activation", GATED_ACTIVATIONS, cfg.activation,
                                              TO_HF_GATED[cfg.activation]),
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=spec.tie_embeddings, attention_bias=cfg.use_attn_bias,
            attention_dropout=cfg.attn_dropout, attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=spec.logit_softcap, **rope_fields(config_class, cfg.rope_base),
        )
        if origin_config is not None and spec.max_seq_len == window_limit(origin_config):
            return fields  # the source's max_position_embeddings, sliding window and layer types stay
        # A model built in tformer attends to everything: every layer is a full-attention layer (Gemma2Model
        # builds a sliding mask whatever the layer types, so the window is set, to the whole length).
        fields.update(max_position_embeddings=spec.max_seq_len, sliding_window=spec.max_seq_len,
                      layer_types=["full_attention"] * spec.n_layers)
        return fields


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
