"""Run every registered norm x placement combination once: the grid a new user can check on their machine."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .config import BlockConfig
from .norms import NORMS
from .placements import PLACEMENTS, stream_tensor
from .stacks import Decoder, Encoder


@dataclass
class GridRow:
    norm: str
    placement: str
    residual_rms: float  # RMS of the residual stream after the last block, before any final norm
    # (for stack-level placements, of the tensor that stands for their stream: ResiDual's x_a, the sum of hyper-streams)
    finite: bool  # forward outputs and every gradient finite
    all_params_get_grad: bool
    seconds: float


def run_grid(
    d_model: int = 64, n_heads: int = 4, n_layers: int = 6, seq_len: int = 32, batch: int = 4,
    attention: str = "auto", seed: int = 0, n_kv_heads: int | None = None, qk_norm: bool | str = False,
    rope: bool = False,
) -> list[GridRow]:
    """Build an encoder-decoder stack pair for each combination, run forward and backward on random
    data with padding, and report the residual-stream RMS at initialization and gradient health.
    ``n_kv_heads``, ``qk_norm`` and ``rope`` (rotary positions in self-attention) set the attention."""
    rows = []
    base = BlockConfig(d_model=d_model, n_heads=n_heads, d_ff=4 * d_model, attention=attention,
                       n_kv_heads=n_kv_heads, qk_norm=qk_norm)
    for norm in NORMS:
        for placement in PLACEMENTS:
            start = time.perf_counter()
            torch.manual_seed(seed)
            cfg = dataclasses.replace(base, norm=norm, placement=placement)
            encoder = Encoder(cfg, n_layers, n_decoder_layers=n_layers, rope=rope)
            decoder = Decoder(cfg, n_layers, n_encoder_layers=n_layers, rope=rope)
            x = torch.randn(batch, seq_len, d_model)
            pad = torch.zeros(batch, seq_len, dtype=torch.bool)
            pad[-1, seq_len // 2 :] = True
            stream = encoder.layers[0].begin(x)
            for block in encoder.layers:
                stream = block(stream, padding_mask=pad)
            residual = stream_tensor(stream)
            memory = encoder.layers[-1].end(stream, encoder.final_norm, pad)
            y = decoder(x, padding_mask=pad, memory=memory, memory_padding_mask=pad)
            y[~pad].pow(2).mean().backward()
            params = list(encoder.parameters()) + list(decoder.parameters())
            finite = bool(torch.isfinite(y).all()) and all(
                p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params
            )
            rms = residual.detach().pow(2).mean().sqrt().item()
            rows.append(GridRow(norm, placement, rms, finite, all(p.grad is not None for p in params),
                                time.perf_counter() - start))
    return rows


def grid_markdown(rows: list[GridRow]) -> str:
    """A norm x placement table: the residual RMS after the encoder stack, or what failed."""
    placements = list(dict.fromkeys(r.placement for r in rows))
    lines = ["| norm \\ placement | " + " | ".join(placements) + " |",
             "|---|" + "---|" * len(placements)]
    for norm in dict.fromkeys(r.norm for r in rows):
        cells = []
        for placement in placements:
            row = next(r for r in rows if r.norm == norm and r.placement == placement)
            ok = row.finite and row.all_params_get_grad
            cells.append(f"{row.residual_rms:.2f}" if ok else "FAILED")
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
