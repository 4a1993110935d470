import copy
import math

import pytest
import torch

import tformer
from tformer import BlockConfig, ConfigError, Decoder, Encoder, EncoderDecoder, LanguageModel

V = 23


def cfg(**kw):
    base = dict(d_model=16, n_heads=2, d_ff=32)
    base.update(kw)
    return BlockConfig(**base)


@pytest.mark.parametrize("norm", list(tformer.NORMS))
@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "deepnorm", "mixln"])
def test_language_model_is_causal(norm, placement):
    lm = LanguageModel(cfg(norm=norm, placement=placement), 3, V, max_seq_len=16)
    if norm == "powernorm":
        lm.eval()  # training-mode batch statistics span positions (see test_blocks)
    tokens = torch.randint(0, V, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(0, V, (2, 4))
    logits = lm(tokens)
    assert logits.shape == (2, 10, V)
    torch.testing.assert_close(logits[:, :6], copy.deepcopy(lm)(changed)[:, :6])


def test_language_model_padding_invariance():
    lm = LanguageModel(cfg(norm="powernorm", placement="sandwich", norm_options={"warmup_iters": 1}), 2, V, 16)
    tokens = torch.randint(0, V, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 1:] = True
    other = torch.where(pad, torch.randint(0, V, (3, 8)), tokens)
    twin = copy.deepcopy(lm)
    torch.testing.assert_close(lm(tokens, padding_mask=pad)[~pad], twin(other, padding_mask=pad)[~pad])


def test_encoder_decoder_shapes_masks_and_causality():
    model = EncoderDecoder(cfg(placement="post", dropout=0.0), 2, 2, V, max_seq_len=32)
    src, tgt = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 7))
    src_pad = torch.zeros(2, 9, dtype=torch.bool)
    src_pad[1, 5:] = True
    logits = model(src, tgt, src_padding_mask=src_pad)
    assert logits.shape == (2, 7, V)
    other_src = torch.where(src_pad, torch.randint(0, V, (2, 9)), src)
    torch.testing.assert_close(logits, model(other_src, tgt, src_padding_mask=src_pad))
    other_tgt = tgt.clone()
    other_tgt[:, 4:] = torch.randint(0, V, (2, 3))
    torch.testing.assert_close(logits[:, :4], model(src, other_tgt, src_padding_mask=src_pad)[:, :4])


def test_tied_and_untied_embeddings():
    lm = LanguageModel(cfg(), 1, V, 8)
    assert lm.head.weight is lm.embedding.tokens.weight
    untied = LanguageModel(cfg(), 1, V, 8, tie_embeddings=False)
    assert untied.head.weight is not untied.embedding.tokens.weight
    s2s = EncoderDecoder(cfg(), 1, 1, V)
    assert s2s.head.weight is s2s.src_embedding.tokens.weight is s2s.tgt_embedding.tokens.weight
    assert sum(p.numel() for p in lm.parameters()) < sum(p.numel() for p in untied.parameters())


def test_embedding_scale_and_sinusoidal_positions():
    lm = LanguageModel(cfg(), 1, V, 12, positions="sinusoidal")
    emb = lm.embedding
    tokens = torch.randint(0, V, (1, 12))
    pos = torch.arange(12, dtype=torch.float64)[:, None]
    i = torch.arange(0, 16, 2, dtype=torch.float64)
    expected = torch.zeros(12, 16, dtype=torch.float64)
    expected[:, 0::2] = torch.sin(pos / 10000 ** (i / 16))
    expected[:, 1::2] = torch.cos(pos / 10000 ** (i / 16))
    torch.testing.assert_close(emb(tokens)[0], emb.tokens.weight[tokens[0]] * math.sqrt(16) + expected.float())
    # xavier scheme: N(0, d^-1/2) tokens scaled by sqrt(d) have unit variance
    big = LanguageModel(cfg(d_model=256, n_heads=4), 1, 4000, 4)
    assert (big.embedding.tokens.weight * big.embedding.scale).std().item() == pytest.approx(1.0, rel=0.03)
    assert "positions.table" not in lm.state_dict()


@pytest.mark.parametrize("placement, has_final", [("pre", True), ("sandwich", True), ("output", True),
                                                   ("post", False), ("deepnorm", False), ("rezero", False)])
def test_final_norm_by_placement(placement, has_final):
    assert (Encoder(cfg(placement=placement), 2).final_norm is not None) == has_final
    assert (Decoder(cfg(placement=placement), 2).final_norm is not None) == has_final


def test_per_layer_placements_and_mixln():
    enc = Encoder(cfg(), 4, placements=["post", "post", "pre", "sandwich"])
    assert enc.placements == ["post", "post", "pre", "sandwich"]
    assert enc.final_norm is not None
    assert Encoder(cfg(), 2, placements=["pre", "post"]).final_norm is None
    assert Decoder(cfg(placement="mixln"), 8).placements == ["post"] * 2 + ["pre"] * 6
    with pytest.raises(ConfigError, match="placements must be a list of 3"):
        Encoder(cfg(), 3, placements=["pre"])
    with pytest.raises(ConfigError, match="placement='bogus'"):
        Encoder(cfg(), 1, placements=["bogus"])


def test_stack_equals_its_blocks_in_sequence():
    enc = Encoder(cfg(placement="pre"), 3).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    h = x
    for block in enc.layers:
        h = block(h)
    torch.testing.assert_close(enc(x), enc.final_norm(h))


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="n_layers=0"):
        LanguageModel(cfg(), 0, V, 8)
    with pytest.raises(ConfigError, match="vocab_size"):
        LanguageModel(cfg(), 1, 0, 8)
    with pytest.raises(ConfigError, match="positions='rotary'"):
        LanguageModel(cfg(), 1, V, 8, positions="rotary")
    with pytest.raises(ValueError, match="max_seq_len=8"):
        LanguageModel(cfg(), 1, V, 8)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("placement", ["pre", "post", "deepnorm", "sandwich"])
def test_training_lowers_the_loss(placement):
    """A small LM learns a deterministic sequence: loss must fall well below its start."""
    torch.manual_seed(0)
    lm = LanguageModel(cfg(d_model=32, n_heads=4, d_ff=64, placement=placement), 2, V, 16)
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    data = (torch.arange(16)[None, :] * 5 + torch.arange(8)[:, None]) % V
    losses = []
    for _ in range(60):
        logits = lm(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
