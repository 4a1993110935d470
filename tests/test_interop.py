"""from_torch: parity with torch.nn.TransformerEncoderLayer / TransformerDecoderLayer, torch's semantics kept."""

import dataclasses

import pytest
import torch
from torch import nn

import tformer
from tformer import ConfigError, DecoderBlock, EncoderBlock, UnsupportedArgumentError, from_torch

D, H, FF = 32, 4, 64
B, T, S = 3, 6, 5  # batch, target length, memory length

both_placements = pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
both_layouts = pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])


def _perturb(module):
    """Non-trivial weights, biases and norm gains, so every copied tensor matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _torch_layer(kind, norm_first=False, batch_first=True, activation="relu", bias=True, eps=1e-6,
                 dtype=torch.float32):
    cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    layer = cls(D, H, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                norm_first=norm_first, bias=bias, layer_norm_eps=eps, dtype=dtype)
    return _perturb(layer).eval()


def _norm_names(layer):
    return ("norm1", "norm2", "norm3") if isinstance(layer, nn.TransformerDecoderLayer) else ("norm1", "norm2")


def _inputs(dtype=torch.float32):
    """Target, memory and right-padding masks (True = padding) for both."""
    x, memory = torch.randn(B, T, D, dtype=dtype), torch.randn(B, S, D, dtype=dtype)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    memory_pad = torch.zeros(B, S, dtype=torch.bool)
    memory_pad[2, 3:] = True
    return x, memory, pad, memory_pad


def _causal_mask(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)  # True = may not attend


def _batch_major(t, batch_first):
    return t if batch_first else t.transpose(0, 1)


def _torch_decoder(layer, x, memory, pad, memory_pad, **masks):
    bf = layer.self_attn.batch_first
    out = layer(_batch_major(x, bf), _batch_major(memory, bf), tgt_key_padding_mask=pad,
                memory_key_padding_mask=memory_pad, **masks)
    return _batch_major(out, bf)


def _torch_encoder(layer, x, pad, **masks):
    bf = layer.self_attn.batch_first
    return _batch_major(layer(_batch_major(x, bf), src_key_padding_mask=pad, **masks), bf)


def _close(ours, expected, pad, atol=1e-5):
    torch.testing.assert_close(ours[~pad], expected[~pad], rtol=0, atol=atol)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def no_mha_fastpath():
    """torch's encoder-layer fast path (eval, batch-first) reads ``norm.bias`` and fails on norms swapped in
    after construction (nn.RMSNorm has no ``bias``, LayerNorm(bias=False) a None): turn it off for those."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


# --- encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["autograd", "no_grad-fastpath"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@both_layouts
@both_placements
def test_encoder_layer_parity(norm_first, batch_first, activation, bias, grad_enabled):
    layer = _torch_layer("encoder", norm_first, batch_first, activation, bias)
    block = from_torch(layer)
    assert isinstance(block, EncoderBlock) and not block.training
    assert block.cfg.placement == ("pre" if norm_first else "post")
    assert (block.cfg.dropout, block.cfg.attn_dropout, block.cfg.norm_eps) == (0.1, 0.1, 1e-6)
    assert _n_params(block) == _n_params(layer)
    x, _, pad, _ = _inputs()
    with torch.set_grad_enabled(grad_enabled):
        expected = _torch_encoder(layer, x, pad)
        ours = block(x, padding_mask=pad)
    _close(ours, expected, pad)


@both_layouts
@both_placements
def test_encoder_layer_with_causal_src_mask(norm_first, batch_first):
    """causal=True on an encoder layer: a DecoderBlock without cross-attention, = torch with a causal src_mask."""
    layer = _torch_layer("encoder", norm_first, batch_first, "gelu")
    block = from_torch(layer, causal=True)
    assert isinstance(block, DecoderBlock) and block.causal and not block.has_cross_attention
    assert _n_params(block) == _n_params(layer)
    x, _, pad, _ = _inputs()
    expected = _torch_encoder(layer, x, pad, src_mask=_causal_mask(T), is_causal=True)
    _close(block(x, padding_mask=pad), expected, pad)
    assert isinstance(from_torch(layer, causal=False), EncoderBlock)
    assert isinstance(from_torch(layer, causal=None), EncoderBlock)


# --- decoder: causality from the user's intent ---------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@both_layouts
@both_placements
def test_decoder_layer_default_is_torch_default(norm_first, batch_first, activation, bias):
    """Without tgt_mask torch's decoder self-attention sees every target position; so does the conversion."""
    layer = _torch_layer("decoder", norm_first, batch_first, activation, bias)
    x, memory, pad, memory_pad = _inputs()
    expected = _torch_decoder(layer, x, memory, pad, memory_pad)
    for causal in (None, False):
        block = from_torch(layer, causal=causal)
        assert isinstance(block, DecoderBlock) and block.has_cross_attention and not block.causal
        assert _n_params(block) == _n_params(layer)
        _close(block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad), expected, pad)
    assert not from_torch(layer).causal
    # and the difference is visible: a causal conversion does not match the unmasked layer
    causal_out = from_torch(layer, causal=True)(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    assert (causal_out - expected)[~pad].abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask:UserWarning")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@both_layouts
@both_placements
def test_decoder_layer_causal_matches_tgt_mask(norm_first, batch_first, activation, bias):
    layer = _torch_layer("decoder", norm_first, batch_first, activation, bias)
    block = from_torch(layer, causal=True)
    assert block.causal
    x, memory, pad, memory_pad = _inputs()
    ours = block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    _close(ours, _torch_decoder(layer, x, memory, pad, memory_pad, tgt_mask=_causal_mask(T), tgt_is_causal=True), pad)
    float_mask = nn.Transformer.generate_square_subsequent_mask(T)  # torch's own helper, -inf above the diagonal
    _close(ours, _torch_decoder(layer, x, memory, pad, memory_pad, tgt_mask=float_mask), pad)


def test_backends_match_torch_too():
    layer = _torch_layer("decoder", norm_first=True)
    x, memory = torch.randn(2, 4, D), torch.randn(2, 3, D)
    unmasked = layer(x, memory)
    causal = layer(x, memory, tgt_mask=_causal_mask(4), tgt_is_causal=True)
    for attention in ("math", "sdpa", "auto"):
        assert from_torch(layer, attention=attention).cfg.attention == attention
        torch.testing.assert_close(from_torch(layer, attention=attention)(x, memory=memory), unmasked, rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(from_torch(layer, causal=True, attention=attention)(x, memory=memory), causal,
                                   rtol=0, atol=1e-5)


# --- dtype, device, mode -------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@both_layouts
@both_placements
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_float64_is_kept(kind, norm_first, batch_first, causal):
    layer = _torch_layer(kind, norm_first, batch_first, "gelu", dtype=torch.float64)
    block = from_torch(layer, causal=causal)
    assert {p.dtype for p in block.parameters()} == {torch.float64}
    x, memory, pad, memory_pad = _inputs(torch.float64)
    if kind == "decoder":
        masks = dict(tgt_mask=_causal_mask(T), tgt_is_causal=True) if causal else {}
        expected = _torch_decoder(layer, x, memory, pad, memory_pad, **masks)
        ours = block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    else:
        masks = dict(src_mask=_causal_mask(T), is_causal=True) if causal else {}
        expected, ours = _torch_encoder(layer, x, pad, **masks), block(x, padding_mask=pad)
    assert ours.dtype == torch.float64
    _close(ours, expected, pad, atol=1e-10)


def test_half_precision_dtype_is_kept():
    layer = _torch_layer("decoder").to(torch.bfloat16)
    block = from_torch(layer)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    x, memory = torch.randn(2, 4, D, dtype=torch.bfloat16), torch.randn(2, 3, D, dtype=torch.bfloat16)
    torch.testing.assert_close(block(x, memory=memory), layer(x, memory), rtol=0, atol=0.1)


def test_device_mode_and_copies():
    layer = _torch_layer("decoder")
    block = from_torch(layer)
    device = next(layer.parameters()).device
    assert {p.device for p in block.parameters()} == {device}
    assert not block.training and all(not m.training for m in block.modules())
    assert from_torch(layer.train()).training
    assert all(m.training for m in from_torch(layer).modules())
    # copies, not views: changing the block leaves the layer alone
    with torch.no_grad():
        block.attn.qkv.weight.zero_()
        block.attn_residual.norm.weight.zero_()
    assert layer.self_attn.in_proj_weight.abs().sum() > 0 and layer.norm1.weight.abs().sum() > 0


def test_requires_grad_is_kept():
    layer = _torch_layer("encoder")
    layer.linear1.requires_grad_(False)
    block = from_torch(layer)
    assert not block.ffn.w1.weight.requires_grad and not block.ffn.w1.bias.requires_grad
    assert block.ffn.w2.weight.requires_grad and block.attn.qkv.weight.requires_grad


def test_mixed_dtypes_are_refused():
    layer = _torch_layer("encoder")
    layer.linear1.double()
    with pytest.raises(ConfigError, match=r"several dtypes.*layer\.to"):
        from_torch(layer)


# --- norms, each converted on its own ------------------------------------------------------------


def _set_norm(layer, name, norm):
    setattr(layer, name, _perturb(norm.to(next(layer.parameters()).dtype)))


def _decoder_parity(layer, block, dtype=torch.float32, atol=1e-5, causal=False):
    x, memory, pad, memory_pad = _inputs(dtype)
    masks = dict(tgt_mask=_causal_mask(T), tgt_is_causal=True) if causal else {}
    expected = _torch_decoder(layer, x, memory, pad, memory_pad, **masks)
    ours = block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    _close(ours, expected, pad, atol=atol)
    return ours, expected, pad


@both_layouts
@both_placements
def test_each_norm_keeps_its_eps(norm_first, batch_first):
    layer = _torch_layer("decoder", norm_first, batch_first, eps=1e-5)
    layer.norm2.eps = 1e-1
    block = from_torch(layer)
    assert [p.norm.eps for p in (block.attn_residual, block.cross_attn_residual, block.ffn_residual)] == [
        1e-5, 1e-1, 1e-5]
    _decoder_parity(layer, block)
    assert block.spec is None  # one norm_eps in BlockConfig cannot describe it: save refuses it
    with pytest.raises(tformer.CheckpointError):
        tformer.save(block, "unused.safetensors")
    # the difference matters: with one shared eps the outputs do not match
    block.cross_attn_residual.norm.eps = 1e-5
    x, memory, pad, memory_pad = _inputs()
    shared = block(x, padding_mask=pad, memory=memory, memory_padding_mask=memory_pad)
    assert (shared - _torch_decoder(layer, x, memory, pad, memory_pad))[~pad].abs().max() > 1e-3


def test_plain_layer_keeps_its_spec(tmp_path):
    layer = _torch_layer("decoder", norm_first=True)
    block = from_torch(layer, causal=True)
    assert block.spec is not None
    tformer.save(block, tmp_path / "block.safetensors")
    loaded = tformer.load(tmp_path / "block.safetensors").eval()
    assert loaded.causal and loaded.cfg == block.cfg
    _decoder_parity(layer, loaded, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-3, None], ids=["eps", "eps_None"])
@both_layouts
@both_placements
def test_rmsnorm_norms(norm_first, batch_first, eps, dtype):
    layer = _torch_layer("decoder", norm_first, batch_first, dtype=dtype)
    for name in _norm_names(layer):
        _set_norm(layer, name, nn.RMSNorm(D, eps=eps))
    block = from_torch(layer)
    assert block.cfg.norm == "rmsnorm"
    expected_eps = eps if eps is not None else torch.finfo(dtype).eps
    assert {p.norm.eps for p in (block.attn_residual, block.cross_attn_residual, block.ffn_residual)} == {
        expected_eps}
    assert _n_params(block) == _n_params(layer)
    assert block.spec is not None
    _decoder_parity(layer, block, dtype, atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_rmsnorm_eps_none_matters(no_mha_fastpath):
    """Tiny activations: the eps torch picks when eps=None is what the conversion uses (not tformer's 1e-5)."""
    layer = _torch_layer("encoder", norm_first=True)
    for name in _norm_names(layer):
        _set_norm(layer, name, nn.RMSNorm(D))
    x = torch.randn(2, 4, D) * 1e-3
    block = from_torch(layer)
    torch.testing.assert_close(block(x), layer(x), rtol=0, atol=1e-5)
    block.attn_residual.norm.eps = 1e-5
    assert (block(x) - layer(x)).abs().max() > 1e-2


@both_layouts
@both_placements
def test_mixed_norm_kinds(norm_first, batch_first):
    layer = _torch_layer("decoder", norm_first, batch_first)
    _set_norm(layer, "norm1", nn.RMSNorm(D, eps=1e-4))
    _set_norm(layer, "norm3", nn.LayerNorm(D, eps=1e-3, bias=False))
    block = from_torch(layer)
    kinds = [type(p.norm).__name__ for p in (block.attn_residual, block.cross_attn_residual, block.ffn_residual)]
    assert kinds == ["RMSNorm", "LayerNorm", "LayerNorm"]
    assert block.ffn_residual.norm.bias is None and block.ffn_residual.norm.eps == 1e-3
    assert _n_params(block) == _n_params(layer) and block.spec is None
    _decoder_parity(layer, block)


@both_placements
def test_norms_without_affine(norm_first):
    layer = _torch_layer("decoder", norm_first)
    layer.norm1 = nn.LayerNorm(D, elementwise_affine=False)
    layer.norm2 = nn.RMSNorm(D, elementwise_affine=False)
    block = from_torch(layer)
    assert _n_params(block) == _n_params(layer)  # no learned parameters where torch has none
    assert block.attn_residual.norm.weight is None and block.attn_residual.norm.bias is None
    _decoder_parity(layer, block)
    block.train()(torch.randn(2, 3, D), memory=torch.randn(2, 2, D)).sum().backward()  # trains


def test_biases_mapped_per_module(no_mha_fastpath):
    layer = _torch_layer("decoder", bias=False)  # torch: bias-free linears and LayerNorms
    block = from_torch(layer)
    assert (block.cfg.use_norm_bias, block.cfg.use_attn_bias, block.cfg.use_ffn_bias) == (False, False, False)
    assert not [n for n, _ in block.named_parameters() if n.endswith("bias")]
    _decoder_parity(layer, block)
    # biased linears, bias-free norms (as many LLM-style layers)
    layer = _torch_layer("encoder")
    for name in _norm_names(layer):
        _set_norm(layer, name, nn.LayerNorm(D, bias=False))
    block = from_torch(layer)
    assert (block.cfg.use_norm_bias, block.cfg.use_attn_bias, block.cfg.use_ffn_bias) == (False, True, True)
    assert block.spec is not None and _n_params(block) == _n_params(layer)
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(block(x), layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("activation, name", [
    (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"), (torch.nn.functional.silu, "silu"),
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"),
])
def test_activation_modules(activation, name):
    layer = _torch_layer("encoder", activation=activation)
    block = from_torch(layer)
    assert block.cfg.activation == name
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(block(x), layer(x), rtol=0, atol=1e-5)


def test_dropout_sites_kept():
    layer = _torch_layer("decoder")
    layer.dropout2.p, layer.multihead_attn.dropout = 0.3, 0.2
    block = from_torch(layer)
    assert block.attn_residual.dropout.p == 0.1 and block.cross_attn_residual.dropout.p == 0.3
    assert block.attn.attn_dropout == 0.1 and block.cross_attn.attn_dropout == 0.2
    assert block.spec is None


# --- what the converted block is called with ------------------------------------------------------


def test_torch_style_arguments_name_the_replacement():
    decoder = from_torch(_torch_layer("decoder"))
    encoder = from_torch(_torch_layer("encoder"))
    x, memory, pad, memory_pad = _inputs()
    cases = [
        (decoder, dict(memory=memory, tgt_mask=_causal_mask(T)), "causal"),
        (decoder, dict(memory=memory, tgt_is_causal=True), "causal"),
        (decoder, dict(memory=memory, tgt_key_padding_mask=pad), "padding_mask="),
        (decoder, dict(memory=memory, memory_key_padding_mask=memory_pad), "memory_padding_mask="),
        (decoder, dict(memory=memory, memory_mask=torch.zeros(T, S, dtype=torch.bool)), "memory_padding_mask="),
        (encoder, dict(src_key_padding_mask=pad), "padding_mask="),
        (encoder, dict(src_mask=_causal_mask(T)), "padding_mask="),
        (encoder, dict(is_causal=True), "causal"),
    ]
    for block, kwargs, replacement in cases:
        with pytest.raises(UnsupportedArgumentError, match=replacement) as info:
            block(x, **kwargs)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
        assert next(iter(kwargs.keys() - {"memory"})) in str(info.value)


def test_switch_placement_after_import():
    block = from_torch(_torch_layer("encoder"))
    sandwich = EncoderBlock(dataclasses.replace(block.cfg, placement="sandwich"))
    copied = sandwich.load_state_dict({k: v for k, v in block.state_dict().items() if ".norm." not in k}, strict=False)
    assert all(".norm_" in k for k in copied.missing_keys)
    assert sandwich(torch.randn(2, 3, D)).shape == (2, 3, D)


# --- refusals -------------------------------------------------------------------------------------


def test_not_a_transformer_layer():
    with pytest.raises(ConfigError, match="TransformerEncoderLayer") as info:
        from_torch(nn.Linear(2, 2))
    assert isinstance(info.value, TypeError)
    stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF), num_layers=2, enable_nested_tensor=False)
    with pytest.raises(ConfigError, match=r"stack\.layers"):
        from_torch(stack)
    with pytest.raises(ConfigError, match="encoder.layers"):
        from_torch(nn.Transformer(D, H, 1, 1, FF, batch_first=True))

    class Custom(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return x

    with pytest.raises(ConfigError, match="overrides _ff_block"):
        from_torch(Custom(D, H, FF))


@pytest.mark.parametrize("causal", ["yes", 1, _causal_mask(3)], ids=["str", "int", "tensor"])
def test_causal_must_be_bool_or_none(causal):
    with pytest.raises(ConfigError, match="True, False or None"):
        from_torch(_torch_layer("decoder"), causal=causal)


def test_unsupported_activation():
    with pytest.raises(ConfigError, match=r"activation.*ffn=") as info:
        from_torch(nn.TransformerEncoderLayer(D, H, FF, activation=torch.tanh))
    assert "gelu_tanh" in str(info.value)


@pytest.mark.parametrize("attention, match", [
    (dict(add_bias_kv=True), "add_bias_kv=False"),
    (dict(add_zero_attn=True), "add_zero_attn=False"),
    (dict(kdim=16, vdim=16), "kdim=16, vdim=16"),
])
@pytest.mark.parametrize("where", ["self_attn", "multihead_attn"])
def test_unsupported_attention(where, attention, match):
    layer = _torch_layer("decoder")
    setattr(layer, where, nn.MultiheadAttention(D, H, batch_first=True, **attention))
    with pytest.raises(ConfigError, match=match) as info:
        from_torch(layer)
    assert where in str(info.value)


def test_inconsistent_biases_are_refused():
    layer = _torch_layer("decoder")
    layer.multihead_attn = nn.MultiheadAttention(D, H, batch_first=True, bias=False)
    with pytest.raises(ConfigError, match="attn_bias"):
        from_torch(layer)
    layer = _torch_layer("encoder")
    layer.linear2 = nn.Linear(FF, D, bias=False)
    with pytest.raises(ConfigError, match="ffn_bias"):
        from_torch(layer)


@pytest.mark.parametrize("norm", [nn.Identity(), nn.BatchNorm1d(D), nn.GroupNorm(1, D)],
                         ids=["Identity", "BatchNorm1d", "GroupNorm"])
def test_unsupported_norm(norm):
    layer = _torch_layer("decoder")
    layer.norm3 = norm
    with pytest.raises(ConfigError, match=rf"layer\.norm3 is a {type(norm).__name__}.*nn\.LayerNorm and nn\.RMSNorm"):
        from_torch(layer)
