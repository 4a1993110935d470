"""Weight initialization schemes (the convention the gradient-scale analyses depend on).

``"xavier"`` (default) is the setting Xiong et al. (2020) and DeepNet analyse and torch.nn's
Transformer uses: Xavier-uniform linear weights, one (d, d) block at a time for fused
projections, zero biases, token embeddings ``N(0, d^-1/2)`` multiplied by ``sqrt(d_model)`` at
the input (Vaswani et al. 2017), so the embedded tokens have unit variance.

``"gpt2"`` is GPT-2's convention: every weight ``N(0, 0.02)``, zero biases, unscaled embeddings.
With it the Post-LN / Pre-LN gradient picture at initialization changes (REFERENCE.md), which
is why the scheme is explicit and switchable (``BlockConfig.init``).

A placement may ask for a different gain for its branch weights (DeepNorm's beta with
Xavier-normal); see ``BranchInit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .registry import Registry


@dataclass(frozen=True)
class BranchInit:
    """How a placement wants its sublayer's value/output/FFN weights initialized.

    ``gain`` multiplies the scheme's scale; ``normal`` selects Xavier-normal (DeepNet's choice)
    instead of Xavier-uniform. Query and key projections always get gain 1.
    """

    gain: float = 1.0
    normal: bool = False


class InitScheme:
    """Initializes linear weights and token embeddings; biases are always zero."""

    def linear_(self, weight: Tensor, gain: float = 1.0, normal: bool = False) -> None:
        raise NotImplementedError

    def embedding_(self, weight: Tensor) -> None:
        raise NotImplementedError

    def embed_scale(self, d_model: int) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def blocks_(self, weight: Tensor, block_rows: int | list[int], gains: list[float], normal: bool = False) -> None:
        """Initialize a fused weight as independent row blocks (``block_rows`` each, or the listed sizes)
        with their own gains."""
        for block, gain in zip(weight.split(block_rows, dim=0), gains, strict=True):
            self.linear_(block, gain, normal)


INIT_SCHEMES: Registry[InitScheme] = Registry("init scheme", field="init")


class XavierInit(InitScheme):
    def linear_(self, weight: Tensor, gain: float = 1.0, normal: bool = False) -> None:
        (nn.init.xavier_normal_ if normal else nn.init.xavier_uniform_)(weight, gain=gain)

    def embedding_(self, weight: Tensor) -> None:
        nn.init.normal_(weight, std=weight.shape[-1] ** -0.5)

    def embed_scale(self, d_model: int) -> float:
        return math.sqrt(d_model)


class GPT2Init(InitScheme):
    std = 0.02

    def linear_(self, weight: Tensor, gain: float = 1.0, normal: bool = False) -> None:
        nn.init.normal_(weight, std=self.std * gain)

    def embedding_(self, weight: Tensor) -> None:
        nn.init.normal_(weight, std=self.std)

    def embed_scale(self, d_model: int) -> float:
        return 1.0


INIT_SCHEMES.register("xavier")(XavierInit())
INIT_SCHEMES.register("gpt2")(GPT2Init())


def zero_bias_(linear: nn.Linear) -> None:
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
