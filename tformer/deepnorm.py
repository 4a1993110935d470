"""DeepNorm's residual scale alpha and init gain beta (Wang et al. 2022, "DeepNet", §4.3)."""

from __future__ import annotations

import numbers


def deepnorm_constants(n_encoder_layers: int, n_decoder_layers: int) -> dict[str, tuple[float, float] | None]:
    """DeepNorm's ``(alpha, beta)`` per stack for N encoder and M decoder layers.

    ========================  =========================  ==========================
    architecture              alpha                      beta
    ========================  =========================  ==========================
    encoder-only (M = 0)      (2N)^(1/4)                 (8N)^(-1/4)
    decoder-only (N = 0)      (2M)^(1/4)                 (8M)^(-1/4)
    enc-dec, encoder          0.81 (N^4 M)^(1/16)        0.87 (N^4 M)^(-1/16)
    enc-dec, decoder          (3M)^(1/4)                 (12M)^(-1/4)
    ========================  =========================  ==========================

    The encoder's beta uses the paper's 0.87 (one public implementation has 1.15). Returns
    ``{"encoder": (alpha, beta) or None, "decoder": (alpha, beta) or None}``.
    """
    for name, n in (("n_encoder_layers", n_encoder_layers), ("n_decoder_layers", n_decoder_layers)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name}={n!r} must be a non-negative integer")
    n, m = int(n_encoder_layers), int(n_decoder_layers)
    if n == 0 and m == 0:
        raise ValueError("deepnorm_constants needs at least one encoder or decoder layer, got 0 and 0")
    if m == 0:
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25), "decoder": None}
    if n == 0:
        return {"encoder": None, "decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    depth = (n**4 * m) ** (1 / 16)
    return {
        "encoder": (0.81 * depth, 0.87 / depth),
        "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
    }
