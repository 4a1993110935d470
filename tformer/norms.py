"""Normalization layers and their registry.

Every norm is an ``nn.Module`` called as ``norm(x, padding_mask=None)`` with ``x`` of shape
``(batch, seq, d_model)`` and ``padding_mask`` a ``(batch, seq)`` bool tensor, True at padding.
Per-token norms ignore the mask; norms with batch statistics (PowerNorm) use it to leave the
padding positions out of their statistics.

Adding a norm is one class plus one ``@NORMS.register(name)`` line; the test suite parametrizes
over the registry and picks it up. RMSNorm (``rmsnorm.py``) and PowerNorm (``powernorm.py``) live in
modules of their own, which ``tformer/__init__.py`` imports to register them. A norm declares what it is through the traits of ``NormTraits``
(class attributes), which tests, the monitor and the causality checks read instead of its name.
A norm that is not registered (any ``nn.Module`` class or ``(d_model) -> module`` callable) can
be used in a ``BlockConfig`` as well; ``custom_norm`` builds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_norms
from .errors import ConfigError
from .registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


class NormTraits:
    """What a norm is, declared as class attributes (defaults shown) and read through ``norm_traits``.

    * ``uses_batch_statistics``: statistics over the batch (PowerNorm, BatchNorm): examples and
      positions influence each other in training mode, so a decoder using it is not causal there.
    * ``needs_padding_mask``: the outputs at real positions depend on which positions are padding
      (true of batch statistics), so callers must pass ``padding_mask``.
    * ``exact_gradient``: the backward is the true gradient of the forward (PowerNorm's is an
      approximation by design), so ``gradcheck`` applies.
    * ``normalizes``: divides by a statistic of its input (False for DyT and the identity).
    """

    uses_batch_statistics: ClassVar[bool] = False
    needs_padding_mask: ClassVar[bool] = False
    exact_gradient: ClassVar[bool] = True
    normalizes: ClassVar[bool] = True

    @classmethod
    def block_defaults(cls, d_model: int, n_heads: int) -> dict:
        """Constructor options this norm takes by default inside a block (PowerNorm: one group per head)."""
        return {}


@dataclass(frozen=True)
class Traits:
    """A norm's traits as values (see ``NormTraits``); norms that declare none get the defaults."""

    uses_batch_statistics: bool = False
    needs_padding_mask: bool = False
    exact_gradient: bool = True
    normalizes: bool = True


def block_defaults(norm_class: type, d_model: int, n_heads: int) -> dict:
    """The options ``norm_class`` takes by default inside a block (``NormTraits.block_defaults``; none for a
    registered class that does not derive from ``NormTraits``)."""
    method = getattr(norm_class, "block_defaults", None)
    return method(d_model, n_heads) if method is not None else {}


def norm_traits(norm: object) -> Traits:
    """The traits of a norm given as a registered name, a class, or an instance."""
    if isinstance(norm, str):
        norm = NORMS[norm]
    if isinstance(norm, TokenwiseNorm):
        norm = norm.norm
    return Traits(**{f: getattr(norm, f, getattr(Traits, f)) for f in Traits.__dataclass_fields__})


@NORMS.register("layernorm")
class LayerNorm(NormTraits, nn.LayerNorm):
    """LayerNorm (Ba et al. 2016): ``g * (x - mean) / sqrt(var + eps) + b`` over the last dim.

    PyTorch's fused kernel; the parameters are named as in ``nn.LayerNorm`` so weights copy
    across unchanged.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(d_model, eps=eps, bias=bias)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@NORMS.register("scalenorm")
class ScaleNorm(NormTraits, nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019): ``g * x / max(||x||_2, eps)`` with one learnable scalar ``g``.

    ``g`` starts at ``sqrt(d_model)``, so a fresh ScaleNorm maps every token to RMS 1 as LayerNorm
    does. No bias (``bias`` is accepted for the uniform factory signature and ignored). On the CPU in
    float32/float64 a C kernel computes it (``tformer.fused_norms``), elsewhere the composite below.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.full((), d_model**0.5))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if fused_norms.takes_kernel(x, self.scale):  # CPU float32/float64: one C pass each way
            return fused_norms.scale_norm(x, self.scale, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16):
            # in half precision scale / eps overflows (sqrt(d) / 1e-5 > 65504: 0 * inf = NaN for a zero token):
            # the factor and the product in float32, the result cast back
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(self.eps)
            return (x.float() * (self.scale.float() / norm)).to(x.dtype)
        return x * (self.scale / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps))

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@NORMS.register("dyt")
class DyT(NormTraits, nn.Module):
    """Dynamic Tanh (Zhu et al. 2025), a norm-free stand-in: ``g * tanh(a * x) + b``.

    ``a`` is one learnable scalar, initialised to ``alpha_init`` (0.5 in the paper). On the CPU in
    float32/float64 a C kernel computes it with a vectorized tanh (``tformer.fused_norms``; float32
    tanh within 2e-7 relative), elsewhere the composite below.
    """

    normalizes = False

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if fused_norms.takes_kernel(x, self.alpha, self.weight, self.bias):  # CPU float32/float64: C kernel
            return fused_norms.dyt(x, self.alpha, self.weight, self.bias)
        y = torch.tanh(self.alpha * x) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}"


@NORMS.register("none")
class NoNorm(NormTraits, nn.Module):
    """The identity: for placements studied without any normalization."""

    normalizes = False

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return x


@NORMS.register("layernorm_simple")
class LayerNormSimple(NormTraits, nn.Module):
    """LayerNorm-simple (Xu et al. 2019): ``(x - mean) / sqrt(var + eps)`` with no gain and no bias, which
    the paper finds as good as or better than LayerNorm on most tasks. ``bias`` is accepted for the uniform
    factory signature and ignored."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.d_model, self.eps = d_model, eps

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, (self.d_model,), None, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


@NORMS.register("adanorm")
class AdaNorm(NormTraits, nn.Module):
    """AdaNorm (Xu et al. 2019, "Understanding and Improving Layer Normalization"): the gain and
    bias of LayerNorm replaced by an input-adaptive scaling, ``z = C * (1 - k * y) * y`` with
    ``y = (x - mean) / sqrt(var + eps)``, where the factor ``C * (1 - k * y)`` is treated as a constant in
    back-propagation (detached), so only ``y`` carries gradient. ``k = 1/10`` as in the paper; ``C``
    (``scale``) is 1, the value of the authors' training commands. No parameters.

    The paper writes the standard deviation as ``sqrt(mean((x - mean)^2))``; its code (fairseq
    ``LayerNormImpl``, mode ``adanorm``) divides by the *unbiased* standard deviation plus eps. We follow
    the paper, with eps inside the square root as LayerNorm has it.

    On the CPU in float32/float64 a C kernel computes it (``tformer.fused_norms``): LayerNorm's
    forward with the factor applied in the same pass, and LayerNorm's backward of ``dL/dz`` times
    the factor, recomputed from the saved mean and rstd; elsewhere the composite below.
    """

    exact_gradient = False  # by design: the detached factor is treated as a constant

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, k: float = 0.1, scale: float = 1.0):
        super().__init__()
        self.d_model, self.eps, self.k, self.scale = d_model, eps, k, scale

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if fused_norms.takes_kernel(x):  # CPU float32/float64: LayerNorm's passes with the factor fused in
            return fused_norms.ada_norm(x, self.eps, self.k, self.scale)
        y = F.layer_norm(x, (self.d_model,), None, None, self.eps)
        return (self.scale * (1.0 - self.k * y)).detach() * y

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, k={self.k}, scale={self.scale}"


def _option_names(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n in params if n not in ("self", "d_model", "eps", "bias")}


def check_norm_options(name: str, options: dict) -> None:
    """Raise ``ConfigError`` if ``options`` holds a keyword the norm ``name`` does not take."""
    cls = NORMS.get_or_raise(name)
    unknown = set(options) - _option_names(cls)
    if unknown:
        valid = sorted(_option_names(cls))
        raise ConfigError(
            f"norm_options={options!r}: {', '.join(sorted(unknown))} not accepted by norm {name!r}; "
            f"valid options: {', '.join(valid) if valid else 'none'}"
        )


def make_norm(name: str, d_model: int, *, eps: float = 1e-5, bias: bool = True, **options) -> nn.Module:
    """Build the registered norm ``name`` for feature size ``d_model``.

    ``options`` go to the norm's constructor (e.g. ``warmup_iters`` for PowerNorm, ``alpha_init``
    for DyT). (``norm="deepnorm"`` is ``BlockConfig`` shorthand for a placement, not a norm.)
    """
    if name == "deepnorm":
        raise ConfigError("'deepnorm' is BlockConfig shorthand for norm='layernorm', placement='deepnorm', not a norm; "
                          "use make_norm('layernorm', ...)")
    check_norm_options(name, options)
    return NORMS[name](d_model, eps=eps, bias=bias, **options)


class NormFactory:
    """A zero-argument norm constructor that also says the feature size it builds for (``d_model``)."""

    def __init__(self, build: Callable[[], nn.Module], d_model: int):
        self.build, self.d_model = build, d_model

    def __call__(self) -> nn.Module:
        return self.build()

    def __repr__(self) -> str:
        return f"NormFactory({self.build!r}, d_model={self.d_model})"


class TokenwiseNorm(nn.Module):
    """Adapts a norm whose ``forward`` takes only ``x`` (e.g. ``nn.LayerNorm``) to ``(x, padding_mask)``.

    The mask is not passed on: such a norm must not use statistics across tokens.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.norm(x)

    @property
    def weight(self) -> Tensor | None:
        """The wrapped norm's gain, where analysis looks for a norm's weight."""
        return getattr(self.norm, "weight", None)


def _takes_padding_mask(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return "padding_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def custom_norm(factory: Callable[[int], nn.Module], d_model: int) -> nn.Module:
    """Build a norm that is not registered: ``factory(d_model)`` (a class or a callable).

    Its eps and bias are its own business. A module whose ``forward`` does not take
    ``padding_mask`` is wrapped in ``TokenwiseNorm``.
    """
    norm = factory(d_model)
    if not isinstance(norm, nn.Module):
        raise ConfigError(
            f"norm={getattr(factory, '__name__', factory)!r} returned {type(norm).__name__} for d_model={d_model}; "
            f"a norm class or callable must return an nn.Module"
        )
    return norm if _takes_padding_mask(norm) else TokenwiseNorm(norm)

