"""Position-wise feed-forward sublayer and its activation registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from .init import INIT_SCHEMES, BranchInit, zero_bias_
from .registry import Registry

if TYPE_CHECKING:
    from .config import BlockConfig


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity; ``gated`` ones (GLU variants) multiply it by a second projection."""

    fn: Callable[[Tensor], Tensor]
    gated: bool = False


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``, Gemma's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: Registry[Activation] = Registry("activation")
ACTIVATIONS.register("relu")(Activation(F.relu))
ACTIVATIONS.register("gelu")(Activation(F.gelu))
ACTIVATIONS.register("gelu_tanh")(Activation(gelu_tanh))
ACTIVATIONS.register("silu")(Activation(F.silu))
ACTIVATIONS.register("swiglu")(Activation(F.silu, gated=True))  # Shazeer 2020
ACTIVATIONS.register("geglu")(Activation(F.gelu, gated=True))
ACTIVATIONS.register("geglu_tanh")(Activation(gelu_tanh, gated=True))  # Gemma


class FeedForward(nn.Module):
    """``w2(dropout(act(w1 x)))``, or ``w2(dropout(act(w1 x) * w3 x))`` for gated activations.

    ``(batch, seq, d_model) -> (batch, seq, d_model)`` with hidden size ``d_ff``. The dropout
    after the activation is torch.nn's ``TransformerEncoderLayer.dropout`` site.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", bias: bool = True,
                 dropout: float = 0.0, init: str = "xavier"):
        super().__init__()
        self.d_model = d_model
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        INIT_SCHEMES.get_or_raise(init)
        self.init_scheme = init
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w3 = nn.Linear(d_model, d_ff, bias=bias) if self.activation.gated else None
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, cfg: BlockConfig) -> FeedForward:
        """The feed-forward sublayer a ``BlockConfig`` describes."""
        return cls(cfg.d_model, cfg.d_ff, activation=cfg.activation, bias=cfg.use_ffn_bias, dropout=cfg.dropout,
                   init=cfg.init)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation.fn(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(self.dropout(hidden))

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"

    def reset_parameters(self, branch: BranchInit = BranchInit()) -> None:
        scheme = INIT_SCHEMES[self.init_scheme]
        for linear in (self.w1, self.w3, self.w2):
            if linear is not None:
                scheme.linear_(linear.weight, branch.gain, branch.normal)
                zero_bias_(linear)
