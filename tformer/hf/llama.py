"""Llama (``LlamaForCausalLM``): Pre-RMSNorm, rotary positions, gated feed-forward, grouped-query attention.

``gate_proj`` -> ``ffn.w1``, ``up_proj`` -> ``ffn.w3``, ``down_proj`` -> ``ffn.w2`` (tformer's gated
feed-forward is ``w2(act(w1 x) * w3 x)``); ``q_proj``, ``k_proj``, ``v_proj`` stack into the fused ``qkv``.
Llama has no residual dropout: a model converted from it has ``dropout=0``.
"""

from __future__ import annotations

from ..config import BlockConfig
from ..models import LanguageModel
from .core import (Family, Needs, activation_name, check_model, kept_activation, linear_links, norm_links, refuse_hf,
                   register, rope_base_of, rope_fields)

#: Hugging Face ``hidden_act`` of a gated MLP -> tformer's gated activation.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}
TO_HF_GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}


@register
class Llama(Family):
    key = "llama"
    title = "Llama"
    hf_class = "LlamaForCausalLM"
    config_class = "LlamaConfig"
    token_embedding = "model.embed_tokens.weight"
    head = "lm_head.weight"
    #: the placement of both sublayers and whether attention has OLMo 2's QK-norm (subclasses change them)
    placement = "pre"
    qk_norm: bool | str = False

    def check_config(self, config) -> None:
        """Options of the Hugging Face config tformer does not compute."""
        if (getattr(config, "pretraining_tp", 1) or 1) > 1:
            raise refuse_hf(self, "pretraining_tp", config.pretraining_tp,
                            "tformer does not split projections into tensor-parallel slices; set it to 1")

    def tformer_model(self, config):
        self.check_config(config)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim * config.num_attention_heads == config.hidden_size:
            head_dim = None  # the default width: the spec stays the one a hand-written config gives
        activation = activation_name(self, GATED_ACTIVATIONS, config.hidden_act)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        cfg = BlockConfig(
            d_model=config.hidden_size, n_heads=config.num_attention_heads, d_ff=config.intermediate_size,
            norm="rmsnorm", placement=self.placement, activation=activation,
            dropout=0.0, attn_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
            bias=False, attn_bias=getattr(config, "attention_bias", False) or None,
            ffn_bias=self.mlp_bias(config) or None,  # None: follows bias=False, as a config written by hand says it
            norm_eps=float(config.rms_norm_eps), init="gpt2", qk_norm=self.qk_norm,
            n_kv_heads=None if kv_heads == config.num_attention_heads else kv_heads,
            rope_base=rope_base_of(self, config), head_dim=head_dim,
        )
        return LanguageModel, dict(cfg=cfg, n_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                                   max_seq_len=config.max_position_embeddings, positions="rope")

    def mlp_bias(self, config) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def layer_norm_links(self, t: str, h: str) -> list:
        """Llama: ``input_layernorm`` before attention, ``post_attention_layernorm`` before the MLP (Pre-LN)."""
        return (norm_links(f"{t}.attn_residual.norm", f"{h}.input_layernorm", bias=False)
                + norm_links(f"{t}.ffn_residual.norm", f"{h}.post_attention_layernorm", bias=False))

    def links(self, model):
        cfg = model.cfg
        links = linear_links("embedding.tokens", "model.embed_tokens", bias=False)
        for i in range(len(model.decoder.layers)):
            t, h = f"decoder.layers.{i}", f"model.layers.{i}"
            attn = f"{h}.self_attn"
            links += linear_links(f"{t}.attn.qkv", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                                  bias=cfg.use_attn_bias)
            links += linear_links(f"{t}.attn.out", f"{attn}.o_proj", bias=cfg.use_attn_bias)
            if cfg.qk_norm:
                links += norm_links(f"{t}.attn.q_norm", f"{attn}.q_norm", bias=False)
                links += norm_links(f"{t}.attn.k_norm", f"{attn}.k_norm", bias=False)
            links += self.layer_norm_links(t, h)
            links += linear_links(f"{t}.ffn.w1", f"{h}.mlp.gate_proj", bias=cfg.use_ffn_bias)
            links += linear_links(f"{t}.ffn.w3", f"{h}.mlp.up_proj", bias=cfg.use_ffn_bias)
            links += linear_links(f"{t}.ffn.w2", f"{h}.mlp.down_proj", bias=cfg.use_ffn_bias)
        links += norm_links("decoder.final_norm", "model.norm", bias=False)
        if not model.spec.tie_embeddings:
            links += linear_links("head", "lm_head", bias=False)
        return links

    def needs(self) -> Needs:
        return Needs(model_class=LanguageModel, norm="rmsnorm", placement=self.placement, activations=TO_HF_GATED,
                     norm_bias=None, attn_bias=None, ffn_bias=None, qk_norm=self.qk_norm, gqa=True, positions="rope",
                     head_dim=True)

    def check(self, model):
        check_model(self, model, self.needs())

    def hf_config(self, model, origin_config):
        cfg, spec = model.cfg, model.spec
        config_class = type(origin_config) if origin_config is not None else self.transformers_config_class()
        return dict(
            vocab_size=spec.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=spec.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
            hidden_act=kept_activation(origin_config, "hidden_act", GATED_ACTIVATIONS, cfg.activation,
                                       TO_HF_GATED[cfg.activation]),
            max_position_embeddings=spec.max_seq_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=spec.tie_embeddings, attention_bias=cfg.use_attn_bias,
            attention_dropout=cfg.attn_dropout, **self.extra_hf_fields(model),
            **rope_fields(config_class, cfg.rope_base),
        )

    def extra_hf_fields(self, model) -> dict:
        """Fields only Llama's config has."""
        return {"head_dim": model.cfg.head_size, "mlp_bias": model.cfg.use_ffn_bias, "pretraining_tp": 1}

    def transformers_config_class(self):
        from .core import import_transformers

        return getattr(import_transformers(), self.config_class)
