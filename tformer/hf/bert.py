"""BERT (``BertModel``): Post-LN LayerNorm encoder, word + position + token-type embeddings and a LayerNorm.

-> ``tformer.EncoderModel(cfg, n_layers, vocab_size, max_seq_len, n_token_types=type_vocab_size,
embed_norm=True)`` with ``placement="post"``. Its forward returns the last hidden state (BERT's
``last_hidden_state``); the pooler is not part of it: ``from_hf`` keeps its weights aside
(``model.hf_origin``) and ``to_hf`` puts them back.
"""

from __future__ import annotations

from ..config import BlockConfig
from ..models import EncoderModel
from .core import (Family, Needs, activation_name, check_model, kept_activation, linear_links, norm_links, refuse,
                   refuse_hf, register)
from .gpt2 import ACTIVATIONS, TO_HF_ACTIVATIONS


@register
class Bert(Family):
    key = "bert"
    title = "BERT"
    hf_class = "BertModel"
    config_class = "BertConfig"
    token_embedding = "embeddings.word_embeddings.weight"
    extra_prefixes = ("pooler.",)

    def tformer_model(self, config):
        for option, why in (("is_decoder", "tformer converts BERT as an encoder (bidirectional attention)"),
                            ("add_cross_attention", "an EncoderModel has no cross-attention")):
            if getattr(config, option, False):
                raise refuse_hf(self, option, True, why)
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise refuse_hf(self, "position_embedding_type", position_type,
                            "tformer has BERT's absolute learned positions only")
        activation = activation_name(self, ACTIVATIONS, config.hidden_act)
        cfg = BlockConfig(
            d_model=config.hidden_size, n_heads=config.num_attention_heads, d_ff=config.intermediate_size,
            norm="layernorm", placement="post", activation=activation,
            dropout=float(config.hidden_dropout_prob), attn_dropout=float(config.attention_probs_dropout_prob),
            bias=True, norm_eps=float(config.layer_norm_eps), init="gpt2",
        )
        return EncoderModel, dict(cfg=cfg, n_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                                  max_seq_len=config.max_position_embeddings, positions="learned",
                                  n_token_types=config.type_vocab_size, embed_norm=True)

    def links(self, model):
        links = linear_links("embedding.tokens", "embeddings.word_embeddings", bias=False)
        links += linear_links("embedding.positions", "embeddings.position_embeddings", bias=False)
        if model.embedding.token_types is not None:
            links += linear_links("embedding.token_types", "embeddings.token_type_embeddings", bias=False)
        links += norm_links("embedding.norm", "embeddings.LayerNorm", bias=True)
        for i in range(len(model.encoder.layers)):
            t, h = f"encoder.layers.{i}", f"encoder.layer.{i}"
            attn = f"{h}.attention"
            links += linear_links(f"{t}.attn.qkv", (f"{attn}.self.query", f"{attn}.self.key", f"{attn}.self.value"),
                                  bias=True)
            links += linear_links(f"{t}.attn.out", f"{attn}.output.dense", bias=True)
            links += norm_links(f"{t}.attn_residual.norm", f"{attn}.output.LayerNorm", bias=True)
            links += linear_links(f"{t}.ffn.w1", f"{h}.intermediate.dense", bias=True)
            links += linear_links(f"{t}.ffn.w2", f"{h}.output.dense", bias=True)
            links += norm_links(f"{t}.ffn_residual.norm", f"{h}.output.LayerNorm", bias=True)
        return links

    def check(self, model):
        check_model(self, model, Needs(
            model_class=EncoderModel, norm="layernorm", placement="post", activations=TO_HF_ACTIVATIONS,
            norm_bias=True, attn_bias=True, ffn_bias=True, qk_norm=False, gqa=False, positions="learned"))
        if not model.spec.embed_norm:
            raise refuse(self, "embed_norm", False, "embed_norm=True (BERT normalizes its embeddings)")
        if model.encoder.final_norm is not None:
            raise refuse(self, "final_norm", model.spec.final_norm, "no norm after the last layer")

    def hf_config(self, model, origin_config):
        cfg, spec = model.cfg, model.spec
        return dict(
            vocab_size=spec.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=spec.n_layers,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
            hidden_act=kept_activation(origin_config, "hidden_act", ACTIVATIONS, cfg.activation,
                                       TO_HF_ACTIVATIONS[cfg.activation]),
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
            max_position_embeddings=spec.max_seq_len, type_vocab_size=max(spec.n_token_types, 1),
            layer_norm_eps=cfg.norm_eps, is_decoder=False, add_cross_attention=False,
        )

    def build_hf(self, transformers, config, origin):
        pooler = origin is not None and any(k.startswith("pooler.") for k in origin.extra_weights)
        return transformers.BertModel(config, add_pooling_layer=pooler)

    def complete_hf_state(self, model, state, hf_state):
        if model.embedding.token_types is None:  # BERT always adds a token-type embedding: one type, all zeros
            key = "embeddings.token_type_embeddings.weight"
            state[key] = hf_state[key].new_zeros(hf_state[key].shape)
