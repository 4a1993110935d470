"""``tformer.convert.layernorm_to_rmsnorm``: exact LayerNorm -> RMSNorm conversion of Pre-LN models.

Every model here gets random non-trivial weights first (LayerNorm gains and biases far from 1 and 0,
embedding rows and output projections with large per-token means, nonzero biases), so that skipping
any step of the conversion (re-centering a writer, folding a bias, untying the head) shows in the
logits.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import tformer
import tformer.convert
from tformer.placements import PreNorm, ResidualPlacement
from tformer.rmsnorm import RMSNorm

D, VOCAB, SEQ = 32, 61, 12
convert = tformer.convert.layernorm_to_rmsnorm


def config(**changes) -> tformer.BlockConfig:
    return tformer.BlockConfig(**{"d_model": D, "n_heads": 4, "d_ff": 48, "norm": "layernorm", **changes})


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial weights: norm gains around 1 +- 0.4, norm and linear biases of size 0.3, and
    weight matrices with per-row and per-column offsets (so every write into the stream has a mean)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm)) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            p.copy_((1.0 + 0.4 * noise(*p.shape)) if name.endswith("weight") else 0.3 * noise(*p.shape))
        elif p.dim() == 1:
            p.copy_(0.3 * noise(*p.shape))
        elif p.dim() == 2:
            scale = float(p.std())
            p.add_(0.5 * scale * noise(p.shape[0], 1) + 0.5 * scale * noise(1, p.shape[1]))
    return model


def padded(batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[1, seq - 4:] = True
    return tokens, padding


def lm_logits(model, tokens, padding):
    """Logits at the real positions (padding's carry no meaning: a packed stack leaves zeros there)."""
    logits = model(tokens, padding_mask=padding)
    return logits if padding is None else logits.masked_fill(padding[..., None], 0.0)


def seq2seq_logits(model, src, src_padding, tgt, tgt_padding):
    logits = model(src, tgt, src_padding_mask=src_padding, tgt_padding_mask=tgt_padding)
    return logits if tgt_padding is None else logits.masked_fill(tgt_padding[..., None], 0.0)


def tolerance(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-10


def assert_all_rmsnorm(model: nn.Module) -> None:
    """No LayerNorm anywhere; every placement's norm and every final norm is tformer's RMSNorm."""
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    stacks = [m for m in model.modules() if isinstance(m, (tformer.Encoder, tformer.Decoder))]
    assert stacks
    for stack in stacks:
        assert isinstance(stack.final_norm, RMSNorm)
        assert tformer.norms.norm_traits(stack.final_norm) == tformer.norms.norm_traits("rmsnorm")
        for block in stack.layers:
            for _, placement in block.residual_sublayers().values():
                assert isinstance(placement.norm, RMSNorm)


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def assert_unchanged(model: nn.Module, before: dict, tied: bool) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    if isinstance(model, tformer.LanguageModel):
        assert (model.head.weight is model.embedding.tokens.weight) == tied
    else:
        assert (model.head.weight is model.tgt_embedding.tokens.weight) == tied


LM_CASES = {
    "pre-learned-tied-relu-bias": (config(), {}),
    "pre-sinusoidal-untied-swiglu-nobias": (config(activation="swiglu", bias=False),
                                            {"positions": "sinusoidal", "tie_embeddings": False}),
    "lnscaling-learned-tied-gelu-ffnbias": (config(placement="lnscaling", activation="gelu", bias=False,
                                                   ffn_bias=True), {}),
    "pre-sinusoidal-tied-swiglu-no-norm-bias": (config(activation="swiglu", norm_bias=False),
                                                {"positions": "sinusoidal"}),
    "pre-learned-untied-norm-bias-only": (config(bias=False, norm_bias=True), {"tie_embeddings": False}),
    "lnscaling-sinusoidal-geglu-attnbias": (config(placement="lnscaling", activation="geglu", bias=False,
                                                   attn_bias=True), {"positions": "sinusoidal"}),
    "mixln-3-layers": (config(placement="mixln"), {}),
    "dropout-in-eval": (config(dropout=0.1, attn_dropout=0.1), {}),
    "gpt2-init-qk-norm": (config(init="gpt2", qk_norm=True), {}),
    "torch-layernorm-eps": (config(norm=functools.partial(nn.LayerNorm, eps=1e-6)), {"tie_embeddings": False}),
}
LM_CASES["rope-gqa"] = (config(n_kv_heads=2, activation="swiglu"), {"positions": "rope"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(LM_CASES))
def test_language_model_conversion_is_exact(case, dtype):
    cfg, options = LM_CASES[case]
    torch.manual_seed(0)
    model = perturb(tformer.LanguageModel(cfg, 3, VOCAB, SEQ + 4, **options)).to(dtype).eval()
    tied = options.get("tie_embeddings", True)
    before = snapshot(model)
    tokens, padding = padded(2, SEQ)
    converted = convert(model)
    assert_unchanged(model, before, tied)
    assert converted is not model and type(converted) is tformer.LanguageModel
    assert_all_rmsnorm(converted)
    with torch.no_grad():
        expected, got = lm_logits(model, tokens, padding), lm_logits(converted, tokens, padding)
    assert got.dtype == dtype and not converted.training
    assert (got - expected).abs().max() <= tolerance(dtype), (got - expected).abs().max()
    # the spec says what the model is
    spec = converted.spec
    assert spec.cfg.norm == "rmsnorm" and spec.tie_embeddings is False
    assert converted.head.weight is not converted.embedding.tokens.weight
    assert spec.positions == ("rope" if options.get("positions") == "rope" else "learned")
    assert spec.cfg.norm_eps == (1e-6 if case == "torch-layernorm-eps" else cfg.norm_eps)
    assert spec.placements == model.spec.placements and spec.cfg.placement == cfg.placement
    rebuilt = tformer.LanguageModel.from_spec(spec)
    shapes = {k: v.shape for k, v in converted.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    ln_bias = any(getattr(m, "bias", None) is not None for m in model.modules() if isinstance(m, nn.LayerNorm))
    if ln_bias:  # the readers needed a bias for the LayerNorm's bias to fold into
        assert spec.cfg.use_attn_bias and spec.cfg.use_ffn_bias
        assert converted.head.bias is not None
    else:
        assert spec.cfg.use_attn_bias == cfg.use_attn_bias and spec.cfg.use_ffn_bias == cfg.use_ffn_bias


SEQ2SEQ_CASES = [("learned", True, "relu"), ("sinusoidal", False, "swiglu"), ("sinusoidal", True, "gelu")]
SEQ2SEQ_CASES.append(("rope", True, "swiglu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("positions,tie,activation", SEQ2SEQ_CASES)
def test_encoder_decoder_conversion_is_exact(positions, tie, activation, dtype):
    cfg = config(activation=activation)
    torch.manual_seed(0)
    model = perturb(tformer.EncoderDecoder(cfg, 2, 3, VOCAB, max_seq_len=SEQ + 4, positions=positions,
                                           tie_embeddings=tie)).to(dtype).eval()
    before = snapshot(model)
    src, src_padding = padded(2, SEQ, seed=1)
    tgt, tgt_padding = padded(2, SEQ - 3, seed=2)
    converted = convert(model)
    assert_unchanged(model, before, tie)
    assert_all_rmsnorm(converted)
    with torch.no_grad():
        expected = seq2seq_logits(model, src, src_padding, tgt, tgt_padding)
        got = seq2seq_logits(converted, src, src_padding, tgt, tgt_padding)
        memory_old = model.encode(src, src_padding_mask=src_padding)
        memory_new = converted.encode(src, src_padding_mask=src_padding)
    assert (got - expected).abs().max() <= tolerance(dtype), (got - expected).abs().max()
    # the encoder's final LayerNorm bias went into every cross-attention kv: the memories differ by it
    assert not torch.allclose(memory_old, memory_new)
    spec = converted.spec
    assert spec.cfg.norm == "rmsnorm" and spec.tie_embeddings is False
    assert spec.positions == ("rope" if positions == "rope" else "learned")
    weights = {id(converted.src_embedding.tokens.weight), id(converted.tgt_embedding.tokens.weight),
               id(converted.head.weight)}
    assert len(weights) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("positions", list(tformer.POSITIONS))
def test_encoder_model_conversion_is_exact(positions, dtype):
    """No head: the output is the final norm's output, so a bias-free final norm (norm_bias=False) converts;
    the token-type embedding is re-centered like the token embedding."""
    cfg = config(norm_bias=False, activation="swiglu")
    model = perturb(tformer.EncoderModel(cfg, 3, VOCAB, SEQ, positions=positions, n_token_types=2)).to(dtype).eval()
    before = snapshot(model)
    tokens, padding = padded(2, SEQ)
    types = (torch.arange(SEQ) >= SEQ // 2).long().expand(2, SEQ)
    for fold_gain in (False, True):
        converted = convert(model, fold_gain=fold_gain)
        assert_all_rmsnorm(converted)
        with torch.no_grad():
            expected = model(tokens, padding_mask=padding, token_type_ids=types)
            got = converted(tokens, padding_mask=padding, token_type_ids=types)
        assert (got - expected).abs().max() <= tolerance(dtype), (got - expected).abs().max()
        # the output norm keeps its gain even with fold_gain: no linear layer reads it
        assert torch.equal(converted.encoder.final_norm.weight, model.encoder.final_norm.weight)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert converted.spec.cfg.norm == "rmsnorm" and converted.spec.n_token_types == 2


def test_encoder_model_refusals():
    biased = tformer.EncoderModel(config(), 2, VOCAB, SEQ)
    with torch.no_grad():
        biased.encoder.final_norm.bias.fill_(0.1)
    with pytest.raises(tformer.ConfigError, match=r"encoder\.final_norm has a nonzero bias.*model's output"):
        convert(biased)
    biased.encoder.final_norm.bias.data.zero_()
    convert(biased)  # a zero bias: nothing to add, converts
    with pytest.raises(tformer.ConfigError, match=r"embedding normalizes the embeddings"):
        convert(tformer.EncoderModel(config(norm_bias=False), 2, VOCAB, SEQ, embed_norm=True))
    with pytest.raises(tformer.ConfigError, match=r"no final norm.*reaches the model's output"):
        convert(tformer.EncoderModel(config(norm_bias=False), 2, VOCAB, SEQ, final_norm=False))


def test_fold_gain_leaves_unit_gains():
    cfg = config(placement="lnscaling", activation="swiglu")
    model = perturb(tformer.LanguageModel(cfg, 3, VOCAB, SEQ, positions="sinusoidal")).double().eval()
    converted = convert(model, fold_gain=True)
    assert_all_rmsnorm(converted)
    norms = [m for m in converted.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 7 and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    tokens, padding = padded(2, SEQ)
    with torch.no_grad():
        assert (lm_logits(converted, tokens, padding) - lm_logits(model, tokens, padding)).abs().max() <= 1e-10
    seq2seq = perturb(tformer.EncoderDecoder(cfg, 2, 2, VOCAB, max_seq_len=SEQ)).double().eval()
    folded = convert(seq2seq, fold_gain=True)
    with torch.no_grad():
        args = (tokens, padding, tokens[:, :5], None)
        assert (seq2seq_logits(folded, *args) - seq2seq_logits(seq2seq, *args)).abs().max() <= 1e-10
    with pytest.raises(tformer.ConfigError, match="fold_gain"):
        convert(model, fold_gain=1)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tokens, padding = padded(2, SEQ)
    models = {  # name: (model, how to run it)
        "lm": (perturb(tformer.LanguageModel(config(activation="swiglu", bias=False, norm_bias=True), 3, VOCAB, SEQ,
                                             positions="sinusoidal")).eval(),
               lambda m: lm_logits(m, tokens, padding)),
        "seq2seq": (perturb(tformer.EncoderDecoder(config(), 2, 2, VOCAB, max_seq_len=SEQ)).eval(),
                    lambda m: seq2seq_logits(m, tokens, padding, tokens[:, :7], None)),
        "encoder": (perturb(tformer.EncoderModel(config(norm_bias=False), 2, VOCAB, SEQ, n_token_types=2)).eval(),
                    lambda m: m(tokens, padding_mask=padding)),
    }
    for name, (model, run) in models.items():
        converted = convert(model)
        path = tformer.save(converted, tmp_path / f"{name}.safetensors")
        loaded = tformer.load(path)
        assert loaded.spec == converted.spec
        assert_all_rmsnorm(loaded)
        with torch.no_grad():
            assert torch.equal(run(loaded), run(converted))
            assert (run(loaded) - run(model)).abs().max() <= 1e-5


def test_converted_model_trains():
    torch.manual_seed(0)
    model = perturb(tformer.LanguageModel(config(activation="swiglu"), 3, VOCAB, SEQ)).train()
    converted = convert(model)
    assert converted.training
    optimizer = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    tokens, _ = padded(4, SEQ)
    losses = []
    for _ in range(6):
        logits = converted(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in converted.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_generation_matches():
    torch.manual_seed(0)
    model = perturb(tformer.LanguageModel(config(), 2, VOCAB, 24)).double().eval()
    converted = convert(model)
    prompt, _ = padded(2, 5)
    assert torch.equal(converted.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0))


def test_mode_dtype_flags_and_rng_are_kept():
    model = perturb(tformer.LanguageModel(config(), 2, VOCAB, SEQ)).double().train()
    model.embedding.tokens.weight.requires_grad_(False)  # tied: the head is frozen with it
    model.decoder.layers[1].ffn.w1.weight.requires_grad_(False)
    state = torch.get_rng_state()
    converted = convert(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert converted.training
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    frozen = {name for name, p in converted.named_parameters() if not p.requires_grad}
    head_bias = {"head.bias"}  # a new bias follows its layer's weight
    assert frozen == {"embedding.tokens.weight", "head.weight", "decoder.layers.1.ffn.w1.weight"} | head_bias
    sinusoidal = convert(perturb(tformer.LanguageModel(config(), 2, VOCAB, SEQ, positions="sinusoidal")))
    assert not sinusoidal.embedding.positions.weight.requires_grad  # was a fixed buffer: stays fixed


def test_all_rmsnorm_model_comes_back_as_a_copy():
    model = perturb(tformer.LanguageModel(config(norm="rmsnorm"), 2, VOCAB, SEQ, positions="sinusoidal")).eval()
    copy = convert(model)
    assert copy is not model and copy.spec == model.spec
    assert copy.head.weight is copy.embedding.tokens.weight  # an equivalent copy: tied as the model is
    assert copy.head.weight is not model.head.weight
    tokens, padding = padded(2, SEQ)
    with torch.no_grad():
        assert torch.equal(lm_logits(copy, tokens, padding), lm_logits(model, tokens, padding))


class CustomPre(ResidualPlacement):
    """A pre-style placement written from scratch (not a PreNorm subclass), norm output scaled by 0.5."""

    name = "custom_pre"
    needs_final_norm = True

    def __init__(self, make_norm, layer, dropout=0.0):
        super().__init__(make_norm, layer, dropout)
        self.ln = make_norm()

    def forward(self, x, sublayer, padding_mask=None):
        return x + self.dropout(sublayer(0.5 * self.ln(x, padding_mask)))


class CustomPost(PreNorm):
    """Post-LN hiding behind a Pre-LN class: classified by what it does, not by what it is."""

    name = "pre_in_name_only"

    def forward(self, x, sublayer, padding_mask=None):
        return self.norm(x + sublayer(x), padding_mask)


def test_placements_are_classified_by_behaviour():
    model = perturb(tformer.LanguageModel(config(placement=CustomPre), 2, VOCAB, SEQ)).double().eval()
    tokens, padding = padded(2, SEQ)
    converted = convert(model)
    with torch.no_grad():
        assert (lm_logits(converted, tokens, padding) - lm_logits(model, tokens, padding)).abs().max() <= 1e-10
    with pytest.raises(tformer.ConfigError, match=r"post-style placement 'pre_in_name_only'.*reads x \+ F\(x\)"):
        convert(tformer.LanguageModel(config(placement=CustomPost), 2, VOCAB, SEQ))


def lm(n_layers: int = 2, **changes) -> tformer.LanguageModel:
    return tformer.LanguageModel(config(**changes), n_layers, VOCAB, SEQ)


def swap_norm(model: nn.Module) -> nn.Module:
    model.decoder.layers[1].ffn_residual.norm = tformer.make_norm("rmsnorm", D)
    return model


def custom_attention(model: nn.Module) -> nn.Module:
    model.decoder.layers[0].attn = nn.Identity()
    return model


def without_final_norm(model: nn.Module) -> nn.Module:
    model.decoder.final_norm = None
    return model


def embedding_norm(model: nn.Module) -> nn.Module:
    model.embedding.norm = tformer.make_norm("layernorm", D)
    return model


REFUSALS = {
    "post": (lambda: lm(placement="post"), (r"post-style placement 'post' \(x <- Norm\(x \+ F\(x\)\)\): the norm "
                                            r"reads x \+ F\(x\) and its output becomes the residual stream")),
    "deepnorm": (lambda: lm(norm="deepnorm"), r"post-style placement 'deepnorm'.*reads [0-9.]+ \* x \+ F\(x\)"),
    "sandwich": (lambda: lm(placement="sandwich"), r"placement 'sandwich'.*adds a norm's output to the residual"),
    "output": (lambda: lm(placement="output"), r"placement 'output'.*adds a norm's output to the residual stream"),
    "rezero": (lambda: lm(placement="rezero"), r"placement 'rezero'.*applies no norm.*reads the residual stream"),
    "resi_dual": (lambda: lm(placement="resi_dual"), r"stack-level placement 'resi_dual'.*more than one tensor"),
    "hyper": (lambda: lm(placement="hyper"), r"stack-level placement 'hyper'"),
    "mixln-with-post-layers": (lambda: lm(4, placement="mixln"),
                               r"decoder\.layers\.0\.attn_residual: post-style placement 'post'.*'mixln' runs"),
    "powernorm": (lambda: lm(norm="powernorm"), r"attn_residual\.norm is a PowerNorm, not a LayerNorm"),
    "scalenorm": (lambda: lm(norm="scalenorm"), r"is a ScaleNorm, not a LayerNorm"),
    "dyt": (lambda: lm(norm="dyt"), r"is a DyT, not a LayerNorm"),
    "none": (lambda: lm(norm="none"), r"is a NoNorm, not a LayerNorm"),
    "mixed-norms": (lambda: swap_norm(lm()), (r"mixes LayerNorm \(.*\) and RMSNorm \(decoder\.layers\.1\."
                                              r"ffn_residual\.norm\).*reads the stream's per-token mean")),
    "encoder": (lambda: tformer.Encoder(config(), 2), r"not a bare Encoder.*first LayerNorm reads x itself"),
    "decoder": (lambda: tformer.Decoder(config(), 2), r"not a bare Decoder.*zero-mean"),
    "block": (lambda: tformer.EncoderBlock(config()),
              r"not a bare EncoderBlock.*block's input x comes from its caller"),
    "torch-layer": (lambda: nn.TransformerEncoderLayer(D, 4, batch_first=True, norm_first=True),
                    r"converts tformer's LanguageModel, EncoderModel and EncoderDecoder; got TransformerEncoderLayer"),
    "custom-attention": (lambda: custom_attention(lm()),
                         r"decoder\.layers\.0\.attn \(Identity\) is not tformer's MultiHeadAttention"),
    "no-final-norm": (lambda: without_final_norm(lm()),
                      r"decoder has no final norm.*raw residual stream.*reaches the LM head"),
    "embedding-norm": (lambda: embedding_norm(lm()), r"embedding normalizes the embeddings"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_say_why(case):
    build, message = REFUSALS[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(tformer.ConfigError, match=message):
        convert(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_encoder_decoder_refusal_names_the_stack():
    model = tformer.EncoderDecoder(config(), 2, 2, VOCAB, max_seq_len=SEQ, encoder_placements=["pre", "post"])
    with pytest.raises(tformer.ConfigError, match=re.escape("encoder.layers.1.attn_residual: post-style")):
        convert(model)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model")
