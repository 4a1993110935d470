"""Hugging Face interop: ``from_hf(hf_model)`` and ``to_hf(model)`` (needs the ``hf`` extra).

``from_hf`` takes a ``transformers`` model instance and returns the tformer model that computes the
same function, holding copies of its weights (same dtype and device, eval mode if the input was):

=====================  ==========================================================================
``GPT2LMHeadModel``    ``LanguageModel``: layernorm, pre, learned positions, gelu_tanh, tied head
``LlamaForCausalLM``   ``LanguageModel``: rmsnorm, pre, rope, swiglu, grouped-query attention
``Olmo2ForCausalLM``   ``LanguageModel``: rmsnorm, output ("reordered norm"), rope, qk_norm="full"
``Gemma2ForCausalLM``  ``LanguageModel``: rmsnorm (1 + w), sandwich, rope, geglu_tanh, soft-capping, wide heads
``BertModel``          ``EncoderModel``: layernorm, post, token types, embedding LayerNorm
=====================  ==========================================================================

The causal LMs return the Hugging Face logits (``model(tokens, padding_mask=~attention_mask)``) and
continue prompts token for token as ``generate(..., do_sample=False)`` does (``model.generate(tokens, n,
temperature=0)``, with tformer's KV cache); ``BertModel`` gives the ``last_hidden_state``. A Hugging
Face option tformer does not compute exactly (scaled rotary positions, GPT-2's inverse-layer-index
attention scaling, Gemma 2's bidirectional attention, ...) raises ``tformer.ConfigError`` naming it:
nothing is approximated. Gemma 2's sliding window is honoured by refusing inputs longer than it (see
``tformer.hf.gemma2``): up to that length it changes nothing.

``to_hf`` goes back: it builds the Hugging Face model of the same family (the family the model came
from, else the one its spec describes, or ``family="gpt2" | "llama" | "olmo2" | "gemma2" | "bert"``) and copies
the weights; a model no such class can express raises ``ConfigError`` naming the first field without
an equivalent (``norm="powernorm"``, ``placement="deepnorm"``, ``placement="mixln"``, ...).
``from_hf`` then ``to_hf`` gives back the Hugging Face state dict exactly (BERT's pooler, which the
tformer model does not compute, travels in ``model.hf_origin``).

Dropout is not part of the promise (it does nothing in eval mode): its probabilities are carried to
the sites both have, but the sites differ. tformer's ``dropout`` also acts after the feed-forward
activation, which GPT-2 and BERT do not have, and Llama / OLMo 2 have no residual dropout at all, so
``to_hf`` of a model with ``dropout > 0`` gives a Hugging Face model that trains without it there.

``transformers`` is imported only when one of the two functions runs, so ``import tformer`` works
without it.
"""

from __future__ import annotations

from . import bert, gemma2, gpt2, llama, olmo2  # noqa: F401  (registers the families)
from .core import FAMILIES, HFOrigin, from_hf, to_hf

__all__ = ["FAMILIES", "HFOrigin", "from_hf", "to_hf"]
