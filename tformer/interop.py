"""Conversion from ``torch.nn`` Transformer layers to tformer blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DecoderBlock, EncoderBlock
from .config import BlockConfig


def _activation_name(activation) -> str:
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    if isinstance(activation, nn.GELU) and activation.approximate == "tanh":
        return "gelu_tanh"
    if activation is F.silu or isinstance(activation, nn.SiLU):
        return "silu"
    raise ValueError(f"from_torch: activation {activation!r} has no tformer equivalent; supported: relu, gelu, silu")


def _check_attention(mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(
            "from_torch supports nn.MultiheadAttention with equal q/k/v sizes, no add_bias_kv and no add_zero_attn"
        )


@torch.no_grad()
def _copy_linear(target: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    target.weight.copy_(weight)
    if target.bias is not None:
        target.bias.copy_(bias)


@torch.no_grad()
def _copy_norm(target: nn.Module, source: nn.LayerNorm) -> None:
    target.load_state_dict(source.state_dict())


def from_torch(
    layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, *, attention: str = "auto"
) -> EncoderBlock | DecoderBlock:
    """The ``EncoderBlock``/``DecoderBlock`` equivalent to a torch.nn Transformer layer, weights copied.

    Placement ``pre`` for ``norm_first=True``, else ``post``; dropout, eps, bias and activation
    carried over. The returned block is batch-first whatever ``layer.batch_first`` says, and is
    in the same train/eval mode as ``layer``. In eval mode its outputs match the layer's on the
    same inputs and masks (padding masks, causal decoder self-attention) to float32 rounding.
    """
    if isinstance(layer, nn.TransformerEncoderLayer):
        decoder = False
    elif isinstance(layer, nn.TransformerDecoderLayer):
        decoder = True
    else:
        raise TypeError(
            f"from_torch takes nn.TransformerEncoderLayer or nn.TransformerDecoderLayer, got {type(layer).__name__}"
        )
    self_attn = layer.self_attn
    _check_attention(self_attn)
    d_model = self_attn.embed_dim
    cfg = BlockConfig(
        d_model=d_model,
        n_heads=self_attn.num_heads,
        d_ff=layer.linear1.out_features,
        norm="layernorm",
        placement="pre" if layer.norm_first else "post",
        activation=_activation_name(layer.activation),
        dropout=float(layer.dropout.p),
        attn_dropout=float(self_attn.dropout),
        bias=layer.linear1.bias is not None,
        norm_eps=float(layer.norm1.eps),
        attention=attention,
    )
    block = DecoderBlock(cfg, cross_attention=True) if decoder else EncoderBlock(cfg)
    _copy_linear(block.attn.qkv, self_attn.in_proj_weight, self_attn.in_proj_bias)
    _copy_linear(block.attn.out, self_attn.out_proj.weight, self_attn.out_proj.bias)
    _copy_norm(block.attn_residual.norm, layer.norm1)
    _copy_linear(block.ffn.w1, layer.linear1.weight, layer.linear1.bias)
    _copy_linear(block.ffn.w2, layer.linear2.weight, layer.linear2.bias)
    if decoder:
        cross = layer.multihead_attn
        _check_attention(cross)
        bias = cross.in_proj_bias
        _copy_linear(block.cross_attn.q, cross.in_proj_weight[:d_model], None if bias is None else bias[:d_model])
        _copy_linear(block.cross_attn.kv, cross.in_proj_weight[d_model:], None if bias is None else bias[d_model:])
        _copy_linear(block.cross_attn.out, cross.out_proj.weight, cross.out_proj.bias)
        _copy_norm(block.cross_attn_residual.norm, layer.norm2)
        _copy_norm(block.ffn_residual.norm, layer.norm3)
    else:
        _copy_norm(block.ffn_residual.norm, layer.norm2)
    return block.train(layer.training)
