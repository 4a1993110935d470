"""Wrote these format-version-1 fixtures at commit a61a88f (before the frozen-config redesign); kept for provenance, not rerun."""
import json, torch, tformer
from tformer import BlockConfig
out = "tests/data/format_v1"
torch.manual_seed(0)
cfg = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm="powernorm", placement="sandwich", norm_options={"warmup_iters": 2})
cfg2 = BlockConfig(d_model=16, n_heads=4, d_ff=24, norm="deepnorm", activation="swiglu", bias=False, qk_norm=True)
cfg3 = BlockConfig(d_model=16, n_heads=2, d_ff=32, norm="rmsnorm", placement="mixln", activation="gelu", dropout=0.1)
models = {
    "lm": tformer.LanguageModel(cfg3, 4, 40, 32, positions="sinusoidal", tie_embeddings=False),
    "encdec": tformer.EncoderDecoder(cfg2, 2, 3, 20, max_seq_len=16),
    "encoder": tformer.Encoder(cfg, 2, placements=["post", "pre"]),
    "decoder": tformer.Decoder(cfg2, 2, cross_attention=False),
    "encoder_block": tformer.EncoderBlock(cfg),
    "decoder_block": tformer.DecoderBlock(cfg3, cross_attention=True),
}
g = torch.Generator().manual_seed(1)
expected = {}
for name, m in models.items():
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    # a few training-mode passes so PowerNorm's running statistics are not at their init
    x = torch.randn(2, 5, 16, generator=g)
    toks = torch.randint(0, 20, (2, 5), generator=g)
    m.train()
    for _ in range(3):
        if name == "lm": m(toks)
        elif name == "encdec": m(toks, toks)
        elif name in ("encoder", "encoder_block"): m(x)
        elif name == "decoder": m(x)
        else: m(x, memory=x)
    m.eval()
    tformer.save(m, f"{out}/{name}.safetensors")
    with torch.no_grad():
        if name == "lm": y = m(toks)
        elif name == "encdec": y = m(toks, toks)
        elif name in ("encoder", "encoder_block"): y = m(x)
        elif name == "decoder": y = m(x)
        else: y = m(x, memory=x)
    expected[name] = {"input": (toks if name in ("lm", "encdec") else x).tolist(), "output": y.tolist()}
json.dump(expected, open(f"{out}/expected_outputs.json", "w"))
