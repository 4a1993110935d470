"""Stack-level placements: residual streams that carry more than one tensor from layer to layer.

A one-tensor placement (``placements.py``) sees ``(x, F, padding_mask)``; the two here keep state
that a single residual tensor cannot hold, so their stream is an object that a stack starts with
``begin(x)``, passes through every sublayer, and closes with ``end(stream, final_norm, mask)``
(see ``ResidualPlacement``). Every sublayer of a stack must use the same kind of stream.

* ``resi_dual`` (Xie et al. 2023, "ResiDual: Transformer with Dual Residual Connections"): a
  Post-LN stream and a Pre-LN-style accumulated stream side by side.
* ``hyper`` (Zhu et al. 2025, "Hyper-Connections", ICLR): ``n`` residual streams mixed by learned
  width and depth connections around a Pre-LN sublayer.

Why hyper-connections rather than value residual (x-transformers offers both): a value residual
(Zhou et al. 2024) mixes each layer's attention *values* with the first layer's, which reaches
inside the attention sublayer, so it would break the rule that a placement sees its sublayer only
as ``F`` and would not work with a user's own attention module. Hyper-connections change only
how a sublayer's input is read from, and its output written to, the residual streams: exactly
what a placement owns, for any sublayer, any norm, with padding and a KV cache.

With a KV cache the streams need no caching of their own: they are per position, and positions
meet only inside attention, whose keys and values the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from .config import check_positive_int
from .placements import LayerContext, NormFactory, ResidualPlacement, Sublayer, register


@dataclass
class DualStream:
    """ResiDual's two streams, each ``(batch, seq, d_model)``: ``post`` (x_a) and ``dual`` (x_d)."""

    post: Tensor
    dual: Tensor

    @property
    def hidden(self) -> Tensor:
        return self.post


@register
class ResiDual(ResidualPlacement):
    """ResiDual (Xie et al. 2023), Pre-Post-LN: per sublayer ``F_k``,

    ``x_a <- Norm(x_a + F_k(x_a))`` (the Post-LN stream) and ``x_d <- x_d + F_k(x_a)`` (the
    accumulated, Pre-LN-style stream), both starting at the stack's input ``x``; the stack's output
    is ``x_a + Norm_final(x_d)``. The Post-LN stream keeps representations diverse; ``x_d`` gives
    every sublayer a gradient path that does not pass through a norm, so gradients do not vanish.
    A block used on its own starts both streams from its input and returns ``x_a + x_d``.
    """

    name = "resi_dual"
    formula = "x_a <- Norm(x_a + F(x_a)); x_d <- x_d + F(x_a); out = x_a + Norm(x_d)"
    needs_final_norm = True
    stream = "dual"

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        self.norm = make_norm()

    def begin(self, x: Tensor) -> DualStream:
        return DualStream(post=x, dual=x)

    def forward(self, stream: DualStream, sublayer: Sublayer, padding_mask: Tensor | None = None) -> DualStream:
        branch = self.dropout(sublayer(stream.post))
        return DualStream(post=self.norm(stream.post + branch, padding_mask), dual=stream.dual + branch)

    def end(self, stream: DualStream, final_norm: nn.Module | None, padding_mask: Tensor | None = None) -> Tensor:
        dual = stream.dual if final_norm is None else final_norm(stream.dual, padding_mask)
        return stream.post + dual


@dataclass
class HyperStreams:
    """Hyper-connections' ``n`` residual streams, ``(batch, seq, n, d_model)``."""

    streams: Tensor

    @property
    def hidden(self) -> Tensor:
        return self.streams.sum(-2)


class HyperConnections(ResidualPlacement):
    """Hyper-connections (Zhu et al. 2025) around a Pre-LN sublayer, ``n`` streams ``H`` (n, d) per token:

    ``h = sum_i a_m[i] H_i`` (width connection), ``y = F(Norm(h))``,
    ``H'_j = b[j] y + sum_i a_r[i, j] H_i`` (depth connections).

    Static weights start as in the paper: ``a_m = e_(l mod n)`` for block ``l``, ``a_r = I``,
    ``b = 1``, which is exactly Pre-LN while the streams are equal. Dynamic hyper-connections
    (``dynamic=True``, the paper's DHC) add input-dependent terms
    ``s_a * tanh(Norm_c(H) w_m)``, ``s_a * tanh(Norm_c(H) W_r)`` and ``s_b * tanh(Norm_c(H) w_b)``
    with ``w`` initialized to 0 and ``s_a = s_b = 0.01``. The stack starts with ``n`` copies of its
    input and ends with ``Norm_final(sum_j H_j)``. ``Norm`` and ``Norm_c`` are the configured norm.
    """

    formula = "h = sum_i a_m[i] H_i; H_j <- b[j] F(Norm(h)) + sum_i a_r[i,j] H_i"
    needs_final_norm = True
    n_streams = 4
    dynamic = True
    stream = "hyper4"

    def __init__(self, make_norm: NormFactory, layer: LayerContext, dropout: float = 0.0):
        super().__init__(make_norm, layer, dropout)
        n = self.n_streams
        self.norm = make_norm()
        self.width = nn.Parameter(torch.zeros(n).index_fill_(0, torch.tensor(layer.index % n), 1.0))  # a_m
        self.depth = nn.Parameter(torch.eye(n))  # a_r
        self.out = nn.Parameter(torch.ones(n))  # b
        if self.dynamic:
            self.coeff_norm = make_norm()
            d_model = getattr(make_norm, "d_model", None) or _norm_width(self.norm)
            self.width_fn = nn.Parameter(torch.zeros(d_model))
            self.depth_fn = nn.Parameter(torch.zeros(d_model, n))
            self.out_fn = nn.Parameter(torch.zeros(d_model))
            self.width_scale = nn.Parameter(torch.full((), 0.01))
            self.out_scale = nn.Parameter(torch.full((), 0.01))

    def begin(self, x: Tensor) -> HyperStreams:
        return HyperStreams(repeat(x, "b s d -> b s n d", n=self.n_streams))

    def _weights(self, streams: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if not self.dynamic:
            return self.width, self.depth, self.out
        n = self.n_streams
        mask = None if padding_mask is None else repeat(padding_mask, "b s -> b (s n)", n=n)
        normed = rearrange(self.coeff_norm(rearrange(streams, "b s n d -> b (s n) d"), mask), "b (s n) d -> b s n d", n=n)
        width = self.width + self.width_scale * torch.tanh(normed @ self.width_fn)  # (b, s, n)
        depth = self.depth + self.width_scale * torch.tanh(normed @ self.depth_fn)  # (b, s, n, n)
        out = self.out + self.out_scale * torch.tanh(normed @ self.out_fn)  # (b, s, n)
        return width, depth, out

    def forward(self, stream: HyperStreams, sublayer: Sublayer, padding_mask: Tensor | None = None) -> HyperStreams:
        streams = stream.streams  # (b, s, n, d)
        width, depth, out = self._weights(streams, padding_mask)
        # Sums over the n streams written out: for small n they beat einsum's batched (n x n) matmuls
        # (per-token matrices) 3-4x at small d and stay within 2x of them at d = 512.
        h = (width[..., :, None] * streams).sum(-2)  # (b, s, d)
        y = self.dropout(sublayer(self.norm(h, padding_mask)))  # (b, s, d)
        new = out[..., :, None] * y[..., None, :]  # (b, s, n, d)
        for i in range(self.n_streams):
            new = new + depth[..., i, :, None] * streams[..., i, None, :]
        return HyperStreams(new)

    def end(self, stream: HyperStreams, final_norm: nn.Module | None, padding_mask: Tensor | None = None) -> Tensor:
        h = stream.streams.sum(-2)
        return h if final_norm is None else final_norm(h, padding_mask)

    def extra_repr(self) -> str:
        return f"{self.formula}, n={self.n_streams}, dynamic={self.dynamic}"


def _norm_width(norm: nn.Module) -> int:
    """The feature size a norm was built for (from its first parameter or buffer)."""
    for tensor in (*norm.parameters(), *norm.buffers()):
        if tensor.dim() >= 1:
            return tensor.shape[-1]
    raise ValueError(
        "dynamic hyper-connections need the feature size, but the norm has no per-feature parameter; "
        "use hyper_connections(dynamic=False) with a parameter-free norm"
    )


def hyper_connections(n_streams: int = 4, dynamic: bool = True) -> type[HyperConnections]:
    """A hyper-connections placement class with ``n_streams`` streams (static weights if not ``dynamic``).

    ``BlockConfig(placement=hyper_connections(2, dynamic=False))`` uses it in a model; the
    registered ``"hyper"`` is ``hyper_connections(4, dynamic=True)``.
    """
    check_positive_int("n_streams", n_streams)
    return type(f"HyperConnections{n_streams}{'' if dynamic else 'Static'}", (HyperConnections,),
                {"n_streams": n_streams, "dynamic": bool(dynamic), "stream": f"hyper{n_streams}",
                 "__module__": __name__})


@register
class Hyper(HyperConnections):
    __doc__ = HyperConnections.__doc__
    name = "hyper"
