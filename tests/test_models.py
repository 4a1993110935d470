import copy
import math

import pytest
import torch

import tformer
from tformer.embeddings import is_rotary
from conftest import GRID, NORMS, PLACEMENTS, causal_in_training, quick_norm_options, stack_depth
from tformer import BlockConfig, ConfigError, Decoder, Encoder, EncoderDecoder, LanguageModel

V = 23


def cfg(**kw):
    base = dict(d_model=16, n_heads=2, d_ff=32)
    base.update(kw)
    if isinstance(base.get("norm"), str):
        base.setdefault("norm_options", quick_norm_options(base["norm"]))
    return BlockConfig(**base)


@pytest.mark.parametrize("norm, placement", GRID)
def test_language_model_is_causal(norm, placement):
    """Eval mode for every norm, and training mode too for norms without batch statistics (whose
    training-mode statistics span positions by design, see test_blocks)."""
    lm = LanguageModel(cfg(norm=norm, placement=placement), stack_depth(placement), V, max_seq_len=16)
    tokens = torch.randint(0, V, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(0, V, (2, 4))
    for mode in ["train", "eval"] if causal_in_training(norm) else ["eval"]:
        lm.train(mode == "train")
        twin = copy.deepcopy(lm)
        logits = lm(tokens)
        assert logits.shape == (2, 10, V)
        torch.testing.assert_close(logits[:, :6], twin(changed)[:, :6], msg=f"not causal in {mode} mode")


@pytest.mark.parametrize("norm", NORMS)
def test_language_model_padding_invariance(norm):
    lm = LanguageModel(cfg(norm=norm, placement="sandwich"), 2, V, 16)
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


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_final_norm_follows_the_last_placement_unless_forced(placement):
    """``final_norm=None`` adds the closing norm exactly where the last layer's placement declares
    ``needs_final_norm`` (which placement needs one is checked in test_placements); True/False force it."""
    for make in (lambda **kw: Encoder(cfg(placement=placement), 2, **kw),
                 lambda **kw: Decoder(cfg(placement=placement), 2, cross_attention=False, **kw)):
        stack = make()
        assert (stack.final_norm is not None) == stack.layers[-1].needs_final_norm
        assert make(final_norm=True).final_norm is not None
        assert make(final_norm=False).final_norm is None


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


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("final_norm", [None, True, False])
def test_stack_equals_its_blocks_in_sequence(placement, final_norm):
    """A stack is ``begin``, its blocks passing the stream on, and ``end`` with its final norm; for a
    one-tensor placement the stream is the tensor itself, so that is a plain loop and the final norm."""
    enc = Encoder(cfg(placement=placement), 3, final_norm=final_norm).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    stream = enc.layers[0].begin(x)
    for block in enc.layers:
        stream = block(stream, padding_mask=pad)
    out = enc(x, padding_mask=pad)  # packed: the blocks ran on the real tokens only, zeros at padding
    torch.testing.assert_close(out[~pad], enc.layers[-1].end(stream, enc.final_norm, pad)[~pad])
    assert not out[pad].any()
    if enc.layers[0].stream == "tensor":
        h = x
        for block in enc.layers:
            h = block(h, padding_mask=pad)
        expected = h if enc.final_norm is None else enc.final_norm(h, pad)
        torch.testing.assert_close(out[~pad], expected[~pad])


@pytest.mark.parametrize("positions", list(tformer.POSITIONS))
@pytest.mark.parametrize("init", list(tformer.INIT_SCHEMES))
def test_every_position_encoding_and_init_scheme(positions, init):
    """Each position encoding gives every position its own vector at the embedding (so the model can
    tell positions apart), under each init scheme, whose embedding scale the embedding applies."""
    lm = LanguageModel(cfg(init=init), 1, V, 12, positions=positions)
    assert lm.embedding.scale == tformer.INIT_SCHEMES[init].embed_scale(16)
    same = torch.full((1, 12), 3)
    emb = lm.embedding(same)[0]
    assert torch.isfinite(emb).all()
    if is_rotary(positions):  # rotary positions work inside attention (tests/test_rotary.py): nothing added here
        torch.testing.assert_close(emb, emb[:1].expand_as(emb))
    else:
        assert torch.cdist(emb, emb).add(torch.eye(12)).min() > 0  # all 12 rows distinct
    torch.testing.assert_close(lm.embedding(same[:, 4:7], offset=4), emb[None, 4:7])
    assert torch.isfinite(lm(same)).all()


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="n_layers=0"):
        LanguageModel(cfg(), 0, V, 8)
    with pytest.raises(ConfigError, match="vocab_size"):
        LanguageModel(cfg(), 1, 0, 8)
    with pytest.raises(ConfigError, match="positions='rotary'"):
        LanguageModel(cfg(), 1, V, 8, positions="rotary")
    with pytest.raises(ValueError, match="max_seq_len=8"):
        LanguageModel(cfg(), 1, V, 8)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_lowers_the_loss(placement):
    """A small LM learns a deterministic sequence: loss must fall well below its start."""
    torch.manual_seed(0)
    lm = LanguageModel(cfg(placement=placement), stack_depth(placement), V, 16)
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    data = (torch.arange(16)[None, :] * 5 + torch.arange(8)[:, None]) % V
    losses = []
    for _ in range(25):
        logits = lm(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_encoder_model_is_embeddings_then_the_encoder():
    """BERT's shape: token + position + token-type embeddings, a norm, then the encoder; padding ignored."""
    torch.manual_seed(0)
    model = tformer.EncoderModel(cfg(placement="post"), 2, V, 12, n_token_types=2, embed_norm=True).eval()
    tokens = torch.randint(0, V, (2, 7))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    e = model.embedding
    x = e.tokens(tokens) * e.scale + e.positions(7) + e.token_types(types)
    expected = model.encoder(e.norm(x), padding_mask=pad)
    out = model(tokens, padding_mask=pad, token_type_ids=types)
    torch.testing.assert_close(out, expected)
    other = tokens.clone()
    other[1, 5:] = 0
    torch.testing.assert_close(model(other, padding_mask=pad, token_type_ids=types)[~pad], out[~pad])
    assert not torch.allclose(model(tokens, padding_mask=pad)[~pad], out[~pad])  # token types matter
    with pytest.raises(ValueError, match="n_token_types=0"):
        tformer.EncoderModel(cfg(), 1, V, 12)(tokens, token_type_ids=types)
