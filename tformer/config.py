"""``BlockConfig``: one dataclass that describes a Transformer block, validated at construction."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .backends import BACKENDS
from .errors import ConfigError
from .feedforward import ACTIVATIONS
from .init import INIT_SCHEMES
from .norms import DEEPNORM_ALIAS, NORMS, check_norm_options, make_norm
from .placements import PLACEMENTS


@dataclass
class BlockConfig:
    """What a block is made of: sizes, norm, placement, activation, dropout, attention backend.

    A plain dataclass: ``dataclasses.asdict(cfg)`` round-trips through JSON and
    ``BlockConfig(**d)`` rebuilds it. Every invalid value raises ``tformer.ConfigError`` naming
    the field and the valid choices.

    Fields beyond the core ones:

    * ``placement=None`` means ``"pre"``, or ``"deepnorm"`` with ``norm="deepnorm"``.
      ``norm="deepnorm"`` is shorthand for ``norm="layernorm", placement="deepnorm"``.
    * ``qk_norm``: RMS-normalize queries and keys per head before the dot product.
    * ``init``: the weight initialization scheme (``"xavier"`` or ``"gpt2"``, see ``tformer.init``).
    * ``norm_options``: extra keyword arguments for the norm, e.g. ``{"warmup_iters": 100}``
      for PowerNorm or ``{"alpha_init": 0.5}`` for DyT.
    """

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    norm: str = "layernorm"
    placement: str | None = None
    activation: str = "relu"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    attention: str = "auto"
    qk_norm: bool = False
    init: str = "xavier"
    norm_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("d_model", "n_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model, e.g. {_divisors(self.d_model)}"
            )
        self._resolve_deepnorm_shorthand()
        NORMS.get_or_raise(self.norm)
        PLACEMENTS.get_or_raise(self.placement)
        ACTIVATIONS.get_or_raise(self.activation)
        BACKENDS.get_or_raise(self.attention)
        INIT_SCHEMES.get_or_raise(self.init)
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value!r} must be a probability in [0, 1)")
        if not _is_real(self.norm_eps) or not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be a finite number > 0")
        for name in ("bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.norm_options, dict) or not all(isinstance(k, str) for k in self.norm_options):
            raise ConfigError(f"norm_options={self.norm_options!r} must be a dict with string keys")
        check_norm_options(self.norm, self.norm_options)

    def _resolve_deepnorm_shorthand(self) -> None:
        if self.norm == DEEPNORM_ALIAS:
            if self.placement not in (None, "deepnorm"):
                raise ConfigError(
                    f"norm='deepnorm' is shorthand for norm='layernorm', placement='deepnorm' and "
                    f"conflicts with placement={self.placement!r}; write norm='layernorm', "
                    f"placement='deepnorm' for DeepNorm, or norm='layernorm', "
                    f"placement={self.placement!r} for that placement"
                )
            self.norm, self.placement = "layernorm", "deepnorm"
        elif self.placement is None:
            self.placement = "pre"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def norm_factory(self) -> Callable[[], nn.Module]:
        """A zero-argument constructor of this config's norm at ``d_model``."""
        return functools.partial(
            make_norm, self.norm, self.d_model, eps=self.norm_eps, bias=self.bias, **self.norm_options
        )


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0][-6:]
