"""``BlockConfig``: one frozen dataclass that describes a Transformer block, validated at construction."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .attention import resolve_qk_norm
from .backends import BACKENDS
from .errors import ConfigError
from .feedforward import ACTIVATIONS
from .init import INIT_SCHEMES
from .norms import NORMS, NormFactory, block_defaults, check_norm_options, custom_norm, make_norm
from .placements import PLACEMENTS

#: ``norm="deepnorm"`` is shorthand for LayerNorm in the DeepNorm placement; only ``BlockConfig`` reads it.
DEEPNORM_SHORTHAND = "deepnorm"


@dataclass(frozen=True)
class BlockConfig:
    """What a block is made of: sizes, norm, placement, activation, dropout, attention backend.

    Frozen (``dataclasses.replace(cfg, placement="post")`` makes a variant), so one config can be
    shared by every layer of a stack. ``dataclasses.asdict(cfg)`` round-trips through JSON and
    ``BlockConfig(**d)`` rebuilds it while ``norm`` and ``placement`` hold registered names. Every
    invalid value raises ``tformer.ConfigError`` naming the field and the valid choices.

    Fields beyond the core ones:

    * ``norm``: a registered name (``tformer.NORMS``), or an ``nn.Module`` class or a callable
      ``(d_model) -> module`` whose forward is ``(x, padding_mask=None)`` (a forward that takes
      only ``x`` is adapted); such a one-off norm works in blocks and stacks, and ``tformer.save``
      asks for it to be registered.
    * ``placement``: a registered name (``tformer.PLACEMENTS``), or a ``ResidualPlacement``
      subclass or a callable ``(make_norm, layer, dropout) -> ResidualPlacement``. ``None`` means
      ``"pre"``, or ``"deepnorm"`` with ``norm="deepnorm"``, which is shorthand for
      ``norm="layernorm", placement="deepnorm"``.
    * ``bias`` sets the three switches ``norm_bias``, ``attn_bias`` and ``ffn_bias`` that are left
      at ``None`` (e.g. ``bias=False, ffn_bias=True``: bias-free norms and attention, biased
      feed-forward); ``use_norm_bias`` etc. give the resolved values.
    * ``n_kv_heads``: grouped-query attention (Ainslie et al. 2023): that many key/value heads, each
      shared by ``n_heads / n_kv_heads`` query heads (1: multi-query attention); ``None`` = ``n_heads``.
      A KV cache stores only the key/value heads.
    * ``qk_norm``: RMS-normalize queries and keys before the dot product: ``"head"`` (or ``True``)
      per head over ``head_dim`` (Gemma 3, Qwen 3), ``"full"`` over the whole projection before
      the head split (OLMo 2). Both come before rotary positions, as in those models.
    * ``rope_base``: the base of rotary position frequencies, used where the model's positions
      are ``"rope"``.
    * ``head_dim``: the width of each attention head; ``None`` is ``d_model / n_heads`` (which must
      then divide). Gemma 2 and Qwen 3 use wider or narrower heads (``head_size`` gives the value).
    * ``attn_scale``: the factor on ``q k^T``; ``None`` is ``head_dim ** -0.5`` (Gemma 2 uses
      ``query_pre_attn_scalar ** -0.5``).
    * ``attn_softcap``: attention logit soft-capping, ``c * tanh(scores / c)`` before the softmax
      (Gemma 2 uses 50). Computed by the ``math`` backend only (O(S^2) memory), so ``attention``
      must be ``"auto"`` or ``"math"``.
    * ``init``: the weight initialization scheme (``"xavier"`` or ``"gpt2"``, see ``tformer.init``).
    * ``norm_options``: extra keyword arguments for a registered norm, e.g. ``{"warmup_iters": 100}``
      for PowerNorm or ``{"alpha_init": 0.5}`` for DyT; they override the norm's block defaults
      (PowerNorm: ``group_num = n_heads``).
    """

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    norm: str | Callable[[int], nn.Module] = "layernorm"
    placement: str | Callable | None = None
    activation: str = "relu"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    bias: bool = True
    norm_bias: bool | None = None
    attn_bias: bool | None = None
    ffn_bias: bool | None = None
    norm_eps: float = 1e-5
    attention: str = "auto"
    qk_norm: bool | str = False
    init: str = "xavier"
    norm_options: dict = field(default_factory=dict)
    n_kv_heads: int | None = None
    rope_base: float = 10000.0
    head_dim: int | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None

    def __post_init__(self):
        for name in ("d_model", "n_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model, e.g. {_divisors(self.d_model)}, or set head_dim"
            )
        self._resolve_deepnorm_shorthand()
        NORMS.resolve(self.norm)
        PLACEMENTS.resolve(self.placement)
        ACTIVATIONS.get_or_raise(self.activation)
        BACKENDS.get_or_raise(self.attention)
        INIT_SCHEMES.get_or_raise(self.init)
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value!r} must be a probability in [0, 1)")
        if not _is_real(self.norm_eps) or not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be a finite number > 0")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias={self.bias!r} must be True or False")
        object.__setattr__(self, "qk_norm", resolve_qk_norm(self.qk_norm))  # None (a recipe's null): off
        if self.n_kv_heads is not None:
            check_positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}; e.g. "
                    f"{[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}"
                )
        if not _is_real(self.rope_base) or not (self.rope_base > 1 and math.isfinite(self.rope_base)):
            raise ConfigError(f"rope_base={self.rope_base!r} must be a finite number > 1")
        for name in ("attn_scale", "attn_softcap"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not (value > 0 and math.isfinite(value))):
                raise ConfigError(f"{name}={value!r} must be None or a finite number > 0")
        if self.attn_softcap is not None and self.attention not in ("auto", "math"):
            raise ConfigError(f"attn_softcap={self.attn_softcap!r} is computed by the 'math' attention backend only; "
                              f"attention={self.attention!r} cannot: use attention='auto' or 'math'")
        for name in ("norm_bias", "attn_bias", "ffn_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True, False or None (None: follow bias)")
        if not isinstance(self.norm_options, dict) or not all(isinstance(k, str) for k in self.norm_options):
            raise ConfigError(f"norm_options={self.norm_options!r} must be a dict with string keys")
        if isinstance(self.norm, str):
            check_norm_options(self.norm, self.norm_options)
        elif self.norm_options:
            raise ConfigError(
                f"norm_options={self.norm_options!r} apply to registered norms only; a norm given as a class or "
                f"callable is called with d_model alone, so bind its options yourself (e.g. functools.partial)"
            )

    def _resolve_deepnorm_shorthand(self) -> None:
        if self.norm == DEEPNORM_SHORTHAND:
            if self.placement not in (None, "deepnorm"):
                raise ConfigError(
                    f"norm='deepnorm' is shorthand for norm='layernorm', placement='deepnorm' and "
                    f"conflicts with placement={self.placement!r}; write norm='layernorm', "
                    f"placement='deepnorm' for DeepNorm, or norm='layernorm', "
                    f"placement={self.placement!r} for that placement"
                )
            object.__setattr__(self, "norm", "layernorm")
            object.__setattr__(self, "placement", "deepnorm")
        elif self.placement is None:
            object.__setattr__(self, "placement", "pre")

    @property
    def head_size(self) -> int:
        """The width of one attention head (``head_dim`` resolved)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``n_kv_heads`` resolved)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def use_norm_bias(self) -> bool:
        return self.bias if self.norm_bias is None else self.norm_bias

    @property
    def use_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def use_ffn_bias(self) -> bool:
        return self.bias if self.ffn_bias is None else self.ffn_bias

    @property
    def is_serializable(self) -> bool:
        """Whether ``norm`` and ``placement`` are registered names (what a checkpoint can store)."""
        return isinstance(self.norm, str) and isinstance(self.placement, str)

    def norm_factory(self) -> NormFactory:
        """A zero-argument constructor of this config's norm at ``d_model``."""
        if not isinstance(self.norm, str):
            return NormFactory(functools.partial(custom_norm, self.norm, self.d_model), self.d_model)
        defaults = block_defaults(NORMS[self.norm], self.d_model, self.n_heads)
        build = functools.partial(make_norm, self.norm, self.d_model, eps=self.norm_eps, bias=self.use_norm_bias,
                                  **{**defaults, **self.norm_options})
        return NormFactory(build, self.d_model)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0][-6:]
