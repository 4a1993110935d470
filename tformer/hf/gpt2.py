"""GPT-2 (``GPT2LMHeadModel``): Pre-LN LayerNorm, learned positions, tanh-GELU, biases everywhere, tied head.

GPT-2's ``Conv1D`` stores weights as ``(in, out)``: they are transposed into tformer's ``nn.Linear``
layout, and ``c_attn`` is already the fused ``[q; k; v]`` projection tformer uses.
"""

from __future__ import annotations

from ..config import BlockConfig
from ..models import LanguageModel
from .core import (Family, Needs, activation_name, check_model, kept_activation, linear_links, norm_links, refuse_hf,
                   register)

#: Hugging Face ``activation_function`` -> tformer activation, where tformer computes the same function.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}
#: tformer activation -> the name ``to_hf`` writes.
TO_HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


@register
class GPT2(Family):
    key = "gpt2"
    title = "GPT-2"
    hf_class = "GPT2LMHeadModel"
    config_class = "GPT2Config"
    token_embedding = "transformer.wte.weight"
    head = "lm_head.weight"

    def tformer_model(self, config):
        for option, why in (("scale_attn_by_inverse_layer_idx", "tformer scales attention by 1/sqrt(head_dim) only"),
                            ("reorder_and_upcast_attn", "tformer has no reordered, upcast attention"),
                            ("add_cross_attention", "a LanguageModel has no cross-attention")):
            if getattr(config, option, False):
                raise refuse_hf(self, option, True, why)
        if not getattr(config, "scale_attn_weights", True):
            raise refuse_hf(self, "scale_attn_weights", False, "tformer always scales attention by 1/sqrt(head_dim)")
        activation = activation_name(self, ACTIVATIONS, config.activation_function, "activation_function")
        cfg = BlockConfig(
            d_model=config.n_embd, n_heads=config.n_head, d_ff=config.n_inner or 4 * config.n_embd,
            norm="layernorm", placement="pre", activation=activation,
            dropout=float(config.resid_pdrop), attn_dropout=float(config.attn_pdrop),
            bias=True, norm_eps=float(config.layer_norm_epsilon), init="gpt2",
        )
        return LanguageModel, dict(cfg=cfg, n_layers=config.n_layer, vocab_size=config.vocab_size,
                                   max_seq_len=config.n_positions, positions="learned")

    def links(self, model):
        links = linear_links("embedding.tokens", "transformer.wte", bias=False)
        links += linear_links("embedding.positions", "transformer.wpe", bias=False)
        for i in range(len(model.decoder.layers)):
            t, h = f"decoder.layers.{i}", f"transformer.h.{i}"
            links += norm_links(f"{t}.attn_residual.norm", f"{h}.ln_1", bias=True)
            links += linear_links(f"{t}.attn.qkv", f"{h}.attn.c_attn", bias=True, transposed=True)
            links += linear_links(f"{t}.attn.out", f"{h}.attn.c_proj", bias=True, transposed=True)
            links += norm_links(f"{t}.ffn_residual.norm", f"{h}.ln_2", bias=True)
            links += linear_links(f"{t}.ffn.w1", f"{h}.mlp.c_fc", bias=True, transposed=True)
            links += linear_links(f"{t}.ffn.w2", f"{h}.mlp.c_proj", bias=True, transposed=True)
        links += norm_links("decoder.final_norm", "transformer.ln_f", bias=True)
        if not model.spec.tie_embeddings:
            links += linear_links("head", "lm_head", bias=False)
        return links

    def check(self, model):
        check_model(self, model, Needs(
            model_class=LanguageModel, norm="layernorm", placement="pre", activations=TO_HF_ACTIVATIONS,
            norm_bias=True, attn_bias=True, ffn_bias=True, qk_norm=False, gqa=False, positions="learned"))

    def hf_config(self, model, origin_config):
        cfg = model.cfg
        spec = model.spec
        return dict(
            vocab_size=spec.vocab_size, n_positions=spec.max_seq_len, n_embd=cfg.d_model, n_layer=spec.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff,
            activation_function=kept_activation(origin_config, "activation_function", ACTIVATIONS, cfg.activation,
                                                TO_HF_ACTIVATIONS[cfg.activation]),
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
            layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False, add_cross_attention=False, tie_word_embeddings=spec.tie_embeddings,
        )

