"""Conversion from ``torch.nn`` Transformer layers to tformer blocks (``from_torch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DecoderBlock, EncoderBlock
from .config import BlockConfig
from .errors import ConfigError
from .norms import LayerNorm as _TformerLayerNorm
from .rmsnorm import RMSNorm as _TformerRMSNorm
from .norms import make_norm


class UnsupportedLayerError(ConfigError, TypeError):
    """``from_torch`` was given something that is not a ``torch.nn`` Transformer layer.

    A ``ConfigError`` like every refusal of ``from_torch``, and a ``TypeError`` as Python raises
    for an argument of the wrong type.
    """


#: ``layer.activation`` values and their tformer names (``nn`` modules are matched in ``_activation_name``).
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu"}

#: Methods of the torch layers whose code ``from_torch`` reproduces; a subclass overriding one is refused.
_TORCH_METHODS = ("forward", "_sa_block", "_mha_block", "_ff_block")


def _activation_name(activation) -> str:
    try:
        name = _ACTIVATION_FUNCTIONS.get(activation)
    except TypeError:  # an unhashable callable
        name = None
    if name is not None:
        return name
    if type(activation) is nn.ReLU:
        return "relu"
    if type(activation) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[activation.approximate]
    if type(activation) is nn.SiLU:
        return "silu"
    raise ConfigError(
        f"from_torch: layer.activation={activation!r} has no tformer equivalent. Supported: F.relu / torch.relu / "
        f"nn.ReLU() -> 'relu', F.gelu / nn.GELU() -> 'gelu', nn.GELU(approximate='tanh') -> 'gelu_tanh', "
        f"F.silu / nn.SiLU() -> 'silu' (torch's activation='relu' or 'gelu' gives the first two). For another "
        f"activation, build the block yourself with your own feed-forward: DecoderBlock(cfg, ffn=...) or "
        f"EncoderBlock(cfg, ffn=...)"
    )


def _check_attention(mha, where: str, d_model: int) -> None:
    if not isinstance(mha, nn.MultiheadAttention):
        raise ConfigError(
            f"from_torch: layer.{where} is a {type(mha).__name__}, not an nn.MultiheadAttention; convert a layer "
            f"with torch's attention, or build the block yourself with your module: "
            f"EncoderBlock(cfg, attn=...) / DecoderBlock(cfg, attn=..., cross_attn=...)"
        )
    if not mha._qkv_same_embed_dim:
        raise ConfigError(
            f"from_torch: layer.{where} has kdim={mha.kdim}, vdim={mha.vdim} different from embed_dim="
            f"{mha.embed_dim}; tformer attention projects keys and values from d_model: use "
            f"nn.MultiheadAttention without kdim/vdim (or kdim=vdim=embed_dim)"
        )
    if mha.bias_k is not None:
        raise ConfigError(
            f"from_torch: layer.{where} was built with add_bias_kv=True (learned key/value biases appended to the "
            f"sequence), which tformer attention does not have; use add_bias_kv=False"
        )
    if mha.add_zero_attn:
        raise ConfigError(
            f"from_torch: layer.{where} was built with add_zero_attn=True (a zero key/value appended to the "
            f"sequence), which tformer attention does not have; use add_zero_attn=False"
        )
    if mha.embed_dim != d_model:
        raise ConfigError(f"from_torch: layer.{where}.embed_dim={mha.embed_dim} differs from the layer's d_model="
                          f"{d_model} (linear1.in_features); the sublayers must share one width")
    if (mha.in_proj_bias is None) != (mha.out_proj.bias is None):
        raise ConfigError(
            f"from_torch: layer.{where} has a bias on {'out_proj' if mha.in_proj_bias is None else 'in_proj'} only; "
            f"tformer attention has biases on both projections or on neither (attn_bias): use "
            f"nn.MultiheadAttention(bias=True) or (bias=False)"
        )


def _norm_kind(norm, where: str) -> tuple[str, tuple[int, ...]]:
    if type(norm) in (nn.LayerNorm, _TformerLayerNorm):
        kind = "layernorm"
    elif type(norm) in (nn.RMSNorm, _TformerRMSNorm):
        kind = "rmsnorm"
    else:
        raise ConfigError(
            f"from_torch: layer.{where} is a {type(norm).__name__}; from_torch converts nn.LayerNorm and nn.RMSNorm "
            f"(exactly those classes, whose computation it knows). Use one of them, or build the block yourself "
            f"with your norm: BlockConfig(norm=YourNorm, ...) (any nn.Module class or (d_model) -> module callable)"
        )
    shape = tuple(norm.normalized_shape) if hasattr(norm, "normalized_shape") else (norm.weight.shape[0],)
    return kind, shape


def _norm_eps(norm, kind: str, dtype: torch.dtype) -> float:
    if norm.eps is not None:
        return float(norm.eps)
    # nn.RMSNorm(eps=None) uses the machine epsilon of the dtype its statistics are computed in:
    # float64 for float64 inputs, float32 for float32 and the half types (measured in torch 2.13).
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def _norm_has_weight(norm) -> bool:
    return getattr(norm, "weight", None) is not None


def _norm_has_bias(norm) -> bool:
    return getattr(norm, "bias", None) is not None


def _single_dtype_and_device(layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    tensors = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        listed = ", ".join(sorted(f"{d} on {v}" for d, v in kinds))
        raise ConfigError(
            f"from_torch: the layer's parameters have several dtypes or devices ({listed}); the block gets one: "
            f"call layer.to(dtype=..., device=...) first"
        )
    return next(iter(kinds)) if kinds else (torch.get_default_dtype(), torch.device("cpu"))


def _check_layer(layer) -> bool:
    """True for a decoder layer, False for an encoder layer; raise for anything else."""
    if isinstance(layer, nn.TransformerDecoderLayer):
        base, decoder = nn.TransformerDecoderLayer, True
    elif isinstance(layer, nn.TransformerEncoderLayer):
        base, decoder = nn.TransformerEncoderLayer, False
    else:
        hint = ""
        if isinstance(layer, (nn.TransformerEncoder, nn.TransformerDecoder)):
            hint = (f" A {type(layer).__name__} is a stack: convert its layers one by one, "
                    f"[tformer.from_torch(layer) for layer in stack.layers] (its final `norm`, if any, is separate).")
        elif isinstance(layer, nn.Transformer):
            hint = (" An nn.Transformer holds two stacks: convert the layers of transformer.encoder.layers and "
                    "transformer.decoder.layers one by one.")
        raise UnsupportedLayerError(
            f"from_torch takes one nn.TransformerEncoderLayer or nn.TransformerDecoderLayer, got "
            f"{type(layer).__name__}.{hint}"
        )
    overridden = [m for m in _TORCH_METHODS if hasattr(base, m) and getattr(type(layer), m) is not getattr(base, m)]
    if overridden:
        raise ConfigError(
            f"from_torch: {type(layer).__name__} overrides {', '.join(overridden)} of {base.__name__}, so its "
            f"computation is not torch's and cannot be converted; convert a plain {base.__name__}, or build the "
            f"tformer block yourself (EncoderBlock / DecoderBlock with parts passed in)"
        )
    return decoder


def _check_causal(causal) -> None:
    if causal is None or isinstance(causal, bool):
        return
    if isinstance(causal, torch.Tensor):
        raise ConfigError(
            "from_torch: causal takes True, False or None, not a mask tensor; pass causal=True for a layer used "
            "with a causal (upper-triangular) tgt_mask / src_mask. Other attention masks are not supported: "
            "tformer blocks take padding masks only (padding_mask=, memory_padding_mask=)"
        )
    raise ConfigError(f"from_torch: causal={causal!r} must be True, False or None (None: torch's default, "
                      f"no causal mask)")


@torch.no_grad()
def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    target.copy_(source)
    if isinstance(target, nn.Parameter):
        target.requires_grad_(source.requires_grad)


def _copy_linear(target: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _copy(target.weight, weight)
    if target.bias is not None:
        _copy(target.bias, bias)


def _convert_norm(source: nn.Module, kind: str, d_model: int, eps: float) -> nn.Module:
    """A tformer norm computing what ``source`` computes (uninitialized weights: copied later)."""
    norm = make_norm(kind, d_model, eps=eps, bias=_norm_has_bias(source))
    if not _norm_has_weight(source):  # elementwise_affine=False: no learned parameters, as in torch
        if kind == "layernorm":
            norm.elementwise_affine = False
            norm.weight = None
        else:  # tformer's RMSNorm always multiplies by `weight`: a constant 1, not a parameter
            del norm.weight
            norm.register_buffer("weight", torch.ones(d_model))
    return norm


def _norm_matches(cfg: BlockConfig, source: nn.Module, kind: str, eps: float) -> bool:
    """Whether the norm ``cfg`` builds is the conversion of ``source`` (same kind, eps, parameters)."""
    if kind != cfg.norm or eps != cfg.norm_eps or not _norm_has_weight(source):
        return False
    return kind == "rmsnorm" or _norm_has_bias(source) == cfg.use_norm_bias


def _copy_norm(target: nn.Module, source: nn.Module) -> None:
    if _norm_has_weight(source):
        _copy(target.weight, source.weight)
    if _norm_has_bias(source):
        _copy(target.bias, source.bias)


def from_torch(
    layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer,
    *,
    causal: bool | None = None,
    attention: str = "auto",
) -> EncoderBlock | DecoderBlock:
    """The tformer block equivalent to a ``torch.nn`` Transformer layer, with copies of its weights.

    What it returns:

    * ``nn.TransformerDecoderLayer``: a ``DecoderBlock`` with cross-attention. ``causal=None``
      (the default) or ``False`` keeps torch's default semantics, self-attention without a mask
      (every target position sees every other); ``causal=True`` gives what the torch layer
      computes with a causal ``tgt_mask`` (``nn.Transformer.generate_square_subsequent_mask``).
    * ``nn.TransformerEncoderLayer``: an ``EncoderBlock``; with ``causal=True`` (the torch layer
      used with a causal ``src_mask``) a ``DecoderBlock(cfg, cross_attention=False, causal=True)``,
      whose self-attention and feed-forward sublayers hold the encoder layer's weights 1:1.

    Placement ``pre`` for ``norm_first=True``, else ``post``. Activation, dropout (each site's own
    ``p``), attention dropout and biases (``attn_bias`` from the attention projections, ``ffn_bias``
    from ``linear1``/``linear2``, ``norm_bias`` from the norms) are carried over, and each norm is
    converted on its own: ``nn.LayerNorm`` (its own ``eps``, ``bias``, ``elementwise_affine``;
    without affine the tformer norm has no parameters either) becomes tformer's ``"layernorm"``,
    ``nn.RMSNorm`` (weight, ``eps``) tformer's ``"rmsnorm"``; ``eps=None`` is resolved here to the
    epsilon torch would use for the layer's dtype (``torch.finfo(float32)`` for float32 and the
    half types, ``torch.finfo(float64)`` for float64). A layer may mix the two kinds. ``block.cfg``
    describes the first norm (``norm1``); when the norms, or the dropout sites, differ among
    themselves the config cannot describe the block, and ``block.spec`` is ``None`` (``tformer.save``
    refuses it rather than rebuild it wrongly; save its ``state_dict``).

    The block has the layer's dtype and device and its train/eval mode; ``requires_grad`` of each
    weight is kept. It is batch-first whatever ``layer.batch_first`` says, and takes padding masks
    (``padding_mask=`` for ``src/tgt_key_padding_mask``, ``memory_padding_mask=`` for
    ``memory_key_padding_mask``; True marks padding, as in torch). In eval mode its outputs match the
    layer's to float rounding (1e-5 in float32). ``attention`` picks tformer's attention backend.

    Anything without a tformer equivalent raises ``tformer.ConfigError`` saying what to pass
    instead: another module than these two layers (``UnsupportedLayerError``, also a ``TypeError``),
    a subclass overriding their forward, an activation other than relu / gelu (exact or tanh) /
    silu, attention with ``add_bias_kv``, ``add_zero_attn`` or ``kdim``/``vdim``, a norm other than
    ``nn.LayerNorm``/``nn.RMSNorm``, inconsistent biases within one sublayer, parameters of
    several dtypes or devices, a ``causal`` that is not True / False / None.
    """
    decoder = _check_layer(layer)
    _check_causal(causal)
    causal = bool(causal)
    dtype, device = _single_dtype_and_device(layer)

    d_model = layer.linear1.in_features
    self_attn = layer.self_attn
    _check_attention(self_attn, "self_attn", d_model)
    attentions = [("self_attn", self_attn)]
    if decoder:
        _check_attention(layer.multihead_attn, "multihead_attn", d_model)
        attentions.append(("multihead_attn", layer.multihead_attn))
        if layer.multihead_attn.num_heads != self_attn.num_heads:
            raise ConfigError(
                f"from_torch: self_attn has {self_attn.num_heads} heads and multihead_attn "
                f"{layer.multihead_attn.num_heads}; a tformer block has one n_heads for both"
            )
    attn_biases = {name: mha.in_proj_bias is not None for name, mha in attentions}
    if len(set(attn_biases.values())) > 1:
        raise ConfigError(f"from_torch: the attentions disagree on bias ({attn_biases}); a tformer block has one "
                          f"attn_bias for self- and cross-attention: give both the same bias")
    if layer.linear2.in_features != layer.linear1.out_features or layer.linear2.out_features != d_model:
        raise ConfigError(f"from_torch: linear1 ({layer.linear1.in_features} -> {layer.linear1.out_features}) and "
                          f"linear2 ({layer.linear2.in_features} -> {layer.linear2.out_features}) do not form a "
                          f"d_model -> d_ff -> d_model feed-forward")
    if (layer.linear1.bias is None) != (layer.linear2.bias is None):
        raise ConfigError("from_torch: linear1 and linear2 disagree on bias; tformer's feed-forward has biases on "
                          "both or on neither (ffn_bias): give both the same bias")

    norm_names = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    norms = {}
    for name in norm_names:
        kind, shape = _norm_kind(getattr(layer, name), name)
        if shape != (d_model,):
            raise ConfigError(f"from_torch: layer.{name} normalizes over {shape}, not the last dim ({d_model},); "
                              f"tformer norms normalize over d_model")
        source = getattr(layer, name)
        norms[name] = (source, kind, _norm_eps(source, kind, dtype))
    first, first_kind, first_eps = norms["norm1"]

    # Dropout sites, torch -> tformer: dropout1/2(/3) after each sublayer, `dropout` inside the feed-forward.
    residual_dropouts = [layer.dropout1.p, layer.dropout2.p] + ([layer.dropout3.p] if decoder else [])
    attention_dropouts = [float(mha.dropout) for _, mha in attentions]
    cfg = BlockConfig(
        d_model=d_model,
        n_heads=self_attn.num_heads,
        d_ff=layer.linear1.out_features,
        norm=first_kind,
        placement="pre" if layer.norm_first else "post",
        activation=_activation_name(layer.activation),
        dropout=float(layer.dropout.p),
        attn_dropout=attention_dropouts[0],
        bias=attn_biases["self_attn"],
        norm_bias=_norm_has_bias(first) if first_kind == "layernorm" else None,
        ffn_bias=layer.linear1.bias is not None,
        norm_eps=first_eps,
        attention=attention,
    )
    if decoder:
        block = DecoderBlock(cfg, cross_attention=True, causal=causal)
    elif causal:
        block = DecoderBlock(cfg, cross_attention=False, causal=True)
    else:
        block = EncoderBlock(cfg)

    placements = [block.attn_residual] + ([block.cross_attn_residual] if decoder else []) + [block.ffn_residual]
    described = True  # whether block.cfg (hence block.spec) describes every part of the block
    for placement, (source, kind, eps) in zip(placements, norms.values()):
        placement.norm = _convert_norm(source, kind, d_model, eps)
        described &= _norm_matches(cfg, source, kind, eps)
    for placement, p in zip(placements, residual_dropouts):
        placement.dropout.p = float(p)
        described &= p == cfg.dropout
    attention_modules = [block.attn] + ([block.cross_attn] if decoder else [])
    for module, p in zip(attention_modules, attention_dropouts):
        module.attn_dropout = p
        described &= p == cfg.attn_dropout
    if not described:
        block.spec = None

    block.to(device=device, dtype=dtype)
    _copy_linear(block.attn.qkv, self_attn.in_proj_weight, self_attn.in_proj_bias)
    _copy_linear(block.attn.out, self_attn.out_proj.weight, self_attn.out_proj.bias)
    if decoder:
        cross = layer.multihead_attn
        bias = cross.in_proj_bias
        _copy_linear(block.cross_attn.q, cross.in_proj_weight[:d_model], None if bias is None else bias[:d_model])
        _copy_linear(block.cross_attn.kv, cross.in_proj_weight[d_model:], None if bias is None else bias[d_model:])
        _copy_linear(block.cross_attn.out, cross.out_proj.weight, cross.out_proj.bias)
    _copy_linear(block.ffn.w1, layer.linear1.weight, layer.linear1.bias)
    _copy_linear(block.ffn.w2, layer.linear2.weight, layer.linear2.bias)
    for placement, (source, _, _) in zip(placements, norms.values()):
        _copy_norm(placement.norm, source)
    return block.train(layer.training)
