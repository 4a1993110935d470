"""OLMo 2 (``Olmo2ForCausalLM``): Llama with the norms moved after the sublayers and QK-norm.

Each sublayer is ``x + RMSNorm(F(x))`` (``post_attention_layernorm``, ``post_feedforward_layernorm``):
tformer's ``"output"`` placement. Queries and keys are RMS-normalized over the whole projection
(``q_norm`` over ``n_heads * head_dim``, ``k_norm`` over ``n_kv_heads * head_dim``, eps ``rms_norm_eps``)
before the head split and before rotary positions: ``qk_norm="full"``. The MLP has no biases.
"""

from __future__ import annotations

import dataclasses

from .core import Needs, norm_links, register
from .llama import Llama


@register
class Olmo2(Llama):
    key = "olmo2"
    title = "OLMo 2"
    hf_class = "Olmo2ForCausalLM"
    config_class = "Olmo2Config"
    placement = "output"
    qk_norm = "full"

    def check_config(self, config) -> None:
        pass

    def mlp_bias(self, config) -> bool:
        return False

    def layer_norm_links(self, t: str, h: str) -> list:
        return (norm_links(f"{t}.attn_residual.norm", f"{h}.post_attention_layernorm", bias=False)
                + norm_links(f"{t}.ffn_residual.norm", f"{h}.post_feedforward_layernorm", bias=False))

    def needs(self) -> Needs:
        return dataclasses.replace(super().needs(), ffn_bias=False)

    def extra_hf_fields(self, model) -> dict:
        # Olmo2Config has no head_dim field, but its attention reads one when the config carries it
        return {} if model.cfg.head_dim is None else {"head_dim": model.cfg.head_dim}
