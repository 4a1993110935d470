"""Bad input ends in a tformer error that names the argument, never in an internal traceback; checkpoint dtypes;
debug checks (NaN/inf); and the regressions the property tests (tests/test_properties.py) found."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tformer
from tformer import blocks
from tformer.errors import CheckpointError, ConfigError

D = 8


def cfg(**overrides) -> tformer.BlockConfig:
    return tformer.BlockConfig(**{"d_model": D, "n_heads": 2, "d_ff": 16, **overrides})


# ------------------------------------------------------------------------------------------------ token ids

def test_token_ids_out_of_range_name_the_argument_the_range_and_vocab_size():
    lm = tformer.LanguageModel(cfg(), 1, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=r"tokens holds ids from 1 to 10, outside \[0, vocab_size=10\)"):
        lm(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match=r"tokens holds ids from -1 to 3, outside \[0, vocab_size=10\)"):
        lm(torch.tensor([[3, -1]]))
    with pytest.raises(ValueError, match=r"prompt holds ids from 12 to 12"):
        lm.generate(torch.tensor([[12]]), 2)
    seq2seq = tformer.EncoderDecoder(cfg(), 1, 1, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=r"src_tokens holds ids from 0 to 11"):
        seq2seq(torch.tensor([[0, 11]]), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"tgt_tokens holds ids from -3 to 2"):
        seq2seq(torch.tensor([[0, 1]]), torch.tensor([[-3, 2]]))
    bert = tformer.EncoderModel(cfg(), 1, vocab_size=10, max_seq_len=8, n_token_types=2)
    with pytest.raises(ValueError, match=r"token_type_ids holds ids from 0 to 2, outside \[0, n_token_types=2\)"):
        bert(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of tokens \(1, 2\), got \(1, 3\)"):
        bert(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 1, 1]]))


def test_token_ids_of_a_wrong_type_raise_type_errors():
    lm = tformer.LanguageModel(cfg(), 1, vocab_size=10, max_seq_len=8)
    with pytest.raises(TypeError, match=r"tokens must be integer token ids .*got dtype torch.float32: call tokens.long\(\)"):
        lm(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="tokens must be integer token ids .*torch.bool"):
        lm(torch.tensor([[True]]))
    with pytest.raises(TypeError, match=r"tokens must be a \(batch, seq\) tensor of token ids, got list"):
        lm([[1, 2]])
    assert lm(torch.tensor([[1, 2]], dtype=torch.int32)).shape == (1, 2, 10)  # int32 ids are fine
    with pytest.raises(ValueError, match=r"pad_token_id=10 .*\[0, vocab_size=10\)"):
        lm.generate(torch.tensor([[1]]), 2, eos_token_id=3, pad_token_id=10)
    with pytest.raises(ValueError, match="max_new_tokens=2.5"):
        lm.generate(torch.tensor([[1]]), 2.5)
    with pytest.raises(ValueError, match="temperature=nan"):
        lm.generate(torch.tensor([[1]]), 2, temperature=float("nan"))


def test_token_range_check_runs_on_the_cpu_and_not_while_compiling(monkeypatch):
    from tformer.embeddings import check_token_ids

    lm = tformer.LanguageModel(cfg(), 1, vocab_size=10, max_seq_len=8)
    assert lm(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 10)  # no id at all: nothing to check
    check_token_ids(torch.full((1, 2), 99, device="meta"), 10)  # another device: no host sync unless debugging
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IndexError):  # skipped while tracing (data-dependent); eager mode checks
        lm.embedding(torch.tensor([[10]]))


# ------------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("kind", ["block", "stack"])
def test_a_float_input_of_another_dtype_names_both_dtypes_and_the_fix(kind):
    module = tformer.EncoderBlock(cfg()) if kind == "block" else tformer.Encoder(cfg(), 2)
    where = "EncoderBlock" if kind == "block" else "Encoder"
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        message = (rf"x has dtype {dtype} but the {where} it is passed to has torch.float32 weights: call "
                   rf"x.to\(torch.float32\) on the input, or .to\({dtype}\) on the module")
        with pytest.raises(TypeError, match=message):
            module(torch.randn(2, 3, D, dtype=dtype))
    for dtype in (torch.long, torch.bool, torch.int32):
        with pytest.raises(TypeError, match=rf"x must be a floating-point tensor .*got dtype {dtype}: call x.to"):
            module(torch.zeros(2, 3, D, dtype=dtype))
    module.double()
    assert module(torch.randn(2, 3, D, dtype=torch.float64)).dtype == torch.float64


def test_autocast_inputs_of_another_dtype_are_accepted():
    stack = tformer.Encoder(cfg(), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stack(torch.randn(2, 3, D, dtype=torch.bfloat16)).shape == (2, 3, D)


def test_padding_masks_of_a_wrong_dtype_or_shape_name_the_argument():
    stack = tformer.Decoder(cfg(), 1)
    x, memory = torch.randn(2, 3, D), torch.randn(2, 4, D)
    with pytest.raises(TypeError, match=r"padding mask for x must be a bool tensor .*got torch.float32: pass padding_mask"):
        stack(x, padding_mask=torch.zeros(2, 3), memory=memory)
    with pytest.raises(ValueError, match=r"padding mask for x must have shape \(batch, seq\) = \(2, 3\), got \(2, 4\) \(padding_mask\)"):
        stack(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool), memory=memory)
    with pytest.raises(TypeError, match="padding mask for memory must be a bool tensor .*pass memory_padding_mask"):
        stack(x, memory=memory, memory_padding_mask=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padding mask for memory .*got \(2, 3\) \(memory_padding_mask\)"):
        stack(x, memory=memory, memory_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ memory

@pytest.mark.parametrize("kind", ["block", "stack"])
def test_memory_of_another_batch_or_width_names_memory_and_both_shapes(kind):
    module = tformer.DecoderBlock(cfg()) if kind == "block" else tformer.Decoder(cfg(), 2)
    x = torch.randn(2, 3, D)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    for memory in (torch.randn(3, 4, D), torch.randn(2, 4, D + 1), torch.randn(4, D)):
        message = (rf"memory must have shape \(batch, mem_seq, d_model\) = \(2, mem_seq, {D}\) to match the target x "
                   rf"of shape \(2, 3, {D}\), got memory of shape {re.escape(str(tuple(memory.shape)))}")
        with pytest.raises(ValueError, match=message):
            module(x, memory=memory)
        with pytest.raises(ValueError, match=message):  # a padded (packed) batch too
            module(x, padding_mask=pad, memory=memory)
    with pytest.raises(TypeError, match=r"memory has dtype torch.float64 but .* call memory.to\(torch.float32\)"):
        module(x, memory=torch.randn(2, 4, D, dtype=torch.float64))
    seq2seq = tformer.EncoderDecoder(cfg(), 1, 1, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=r"src_tokens and tgt_tokens must have the same batch size, got src_tokens of "
                                         r"shape \(1, 2\) and tgt_tokens of shape \(2, 2\)"):
        seq2seq(torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]))


def test_a_stack_validates_its_inputs_once_not_per_layer(monkeypatch):
    calls = []
    original = tformer.TransformerBlock.check_input
    monkeypatch.setattr(tformer.TransformerBlock, "check_input", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    stack = tformer.Decoder(cfg(), 4)
    stack(torch.randn(2, 3, D), memory=torch.randn(2, 4, D), padding_mask=torch.tensor([[0, 0, 1], [0, 0, 0]]).bool())
    assert len(calls) == 1
    stack.layers[0](torch.randn(2, 3, D), memory=torch.randn(2, 4, D))  # a block called alone checks itself
    assert len(calls) == 2


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_batches_and_sequences_give_empty_outputs_everywhere(shape):
    batch, seq = shape
    x, pad = torch.randn(batch, seq, D), torch.zeros(batch, seq, dtype=torch.bool)
    memory = torch.randn(batch, 4, D)
    for module in (tformer.EncoderBlock(cfg()), tformer.Encoder(cfg(), 2)):
        assert module(x, padding_mask=pad).shape == (batch, seq, D)
    for module in (tformer.DecoderBlock(cfg()), tformer.Decoder(cfg(), 2)):
        assert module(x, padding_mask=pad, memory=memory).shape == (batch, seq, D)
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    assert tformer.LanguageModel(cfg(), 1, 10, 8)(tokens, padding_mask=pad).shape == (batch, seq, 10)
    assert tformer.EncoderModel(cfg(), 1, 10, 8)(tokens).shape == (batch, seq, D)
    assert tformer.EncoderDecoder(cfg(), 1, 1, 10)(tokens, tokens).shape == (batch, seq, 10)


# ------------------------------------------------------------------------------------------------ debug checks

@pytest.fixture
def debug_off():
    previous = tformer.get_debug_checks()
    tformer.set_debug_checks(False)
    yield
    tformer.set_debug_checks(previous)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_debug_checks_refuse_non_finite_inputs_naming_them(debug_off, bad):
    stack, block = tformer.Decoder(cfg(), 2), tformer.EncoderBlock(cfg())
    x, memory = torch.randn(2, 3, D), torch.randn(2, 4, D)
    x[1, 2, 5] = bad
    assert stack(x, memory=memory).shape == (2, 3, D)  # off by default: nothing is checked
    with tformer.debug_checks():
        nan, inf = (1, 0) if math.isnan(bad) else (0, 1)
        with pytest.raises(ValueError, match=rf"x \(the input of this Decoder\) has non-finite values: {nan} NaN and "
                                             rf"{inf} inf among 48 elements of shape \(2, 3, 8\), the first at index "
                                             rf"\(1, 2, 5\)"):
            stack(x, memory=memory)
        with pytest.raises(ValueError, match=r"x \(the input of this EncoderBlock\) has non-finite values"):
            block(x)
        with pytest.raises(ValueError, match=r"memory \(the encoder output this Decoder attends to\) has non-finite"):
            stack(memory[:, :3], memory=x.new_zeros(2, 4, D).fill_(bad))
        assert bool(torch.isfinite(stack(torch.randn(2, 3, D), memory=memory)).all())
    assert tformer.get_debug_checks() is False  # the context manager restored the mode


def test_debug_checks_blocks_mode_names_the_first_layer_that_went_non_finite(debug_off):
    stack = tformer.Encoder(cfg(), 3)
    with torch.no_grad():
        stack.layers[1].ffn.w2.weight.fill_(float("inf"))
    x = torch.randn(2, 3, D)
    with tformer.debug_checks("inputs"):
        stack(x)  # the input is finite
    with tformer.debug_checks("blocks"):
        with pytest.raises(ValueError, match=r"the output of layer 1 of this Encoder \(EncoderBlock, placement pre\) "
                                             r"has non-finite values"):
            stack(x)
        with pytest.raises(ValueError, match=r"the output of this EncoderBlock has non-finite values"):
            stack.layers[1](x)


def test_debug_check_modes_and_environment(debug_off, monkeypatch):
    for mode, resolved in ((True, "inputs"), ("inputs", "inputs"), ("blocks", "blocks"), (None, False), (False, False)):
        tformer.set_debug_checks(mode)
        assert tformer.get_debug_checks() == resolved
    with pytest.raises(ConfigError, match=r"debug checks mode='all'; valid choices: False \(off\), True or 'inputs', 'blocks'"):
        tformer.set_debug_checks("all")
    for value, resolved in (("1", "inputs"), ("blocks", "blocks"), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv("TFORMER_DEBUG_CHECKS", value)
        assert blocks._debug_mode_from_environment() == resolved
    monkeypatch.setenv("TFORMER_DEBUG_CHECKS", "yes please")
    with pytest.warns(UserWarning, match="TFORMER_DEBUG_CHECKS='yes please' is not one of"):
        assert blocks._debug_mode_from_environment() is False


def test_debug_checks_are_skipped_while_compiling(debug_off, monkeypatch):
    x = torch.full((1, 2, D), float("nan"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with tformer.debug_checks("blocks"):
        tformer.Encoder(cfg(), 1)(x)  # no data-dependent check inside a graph


def test_finite_check_confirms_an_overflowing_sum_exactly():
    big = torch.full((4, 4, D), 6e4, dtype=torch.float16)  # finite, but its sum overflows float16
    blocks.check_finite(big, "x")
    blocks.check_finite(torch.full((2, D), 3e38), "x")  # its float32 sum overflows: confirmed finite


# ------------------------------------------------------------------------------------------------ checkpoints

def _rewrite(path, change):
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_a_stray_tensor_of_another_dtype_is_refused_naming_it_and_both_dtypes(tmp_path):
    path = tmp_path / "model.safetensors"
    tformer.save(tformer.Encoder(cfg(), 1), path)

    def stray(tensors):
        tensors["layers.0.ffn.w1.weight"] = tensors["layers.0.ffn.w1.weight"].half()

    _rewrite(path, stray)
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.ffn.w1.weight' is torch.float16 but the checkpoint's "
                                              r"other floating tensors are torch.float32 .*pass dtype=torch.float32"):
        tformer.load(path)
    loaded = tformer.load(path, dtype=torch.float32)  # asked for: every tensor cast
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}


def test_a_uniform_checkpoint_loads_in_its_own_dtype_or_the_one_asked_for(tmp_path):
    path = tmp_path / "model.safetensors"
    model = tformer.Encoder(cfg(norm="powernorm"), 1).bfloat16()
    tformer.save(model, path)
    loaded = tformer.load(path)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.bfloat16, torch.long}  # PowerNorm's counter
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    widened = tformer.load(path, dtype=torch.float32)
    assert {t.dtype for t in widened.state_dict().values()} == {torch.float32, torch.long}
    with pytest.raises(TypeError, match=r"dtype=torch.int64 must be None .* or a floating torch.dtype"):
        tformer.load(path, dtype=torch.long)

    def float_counter(tensors):
        tensors["layers.0.ffn_residual.norm.iters"] = tensors["layers.0.ffn_residual.norm.iters"].float()

    _rewrite(path, float_counter)
    with pytest.raises(CheckpointError, match=r"'layers.0.ffn_residual.norm.iters' has dtype torch.float32, the model "
                                              r"holds torch.int64 there"):
        tformer.load(path, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ regressions found
# by tests/test_properties.py

@pytest.mark.parametrize("kind", ["empty", "all padding"])
def test_powernorm_batch_without_real_tokens_leaves_its_statistics_alone(kind):
    norm = tformer.make_norm("powernorm", D, warmup_iters=3).train()
    norm(torch.randn(2, 3, D))
    running, iters = norm.running_psi2.clone(), int(norm.iters)
    x = torch.randn(0 if kind == "empty" else 2, 3, D, requires_grad=True)
    pad = None if kind == "empty" else torch.ones(2, 3, dtype=torch.bool)
    y = norm(x, padding_mask=pad)  # was: NaN running_psi2 (empty), or running_psi2 pulled towards 0 (all padding)
    y.sum().backward()
    assert torch.equal(norm.running_psi2, running) and int(norm.iters) == iters
    assert bool(torch.isfinite(norm.nu).all()) and bool(torch.isfinite(y).all())


def test_powernorm_groups_follow_the_heads_only_where_they_divide_d_model():
    with_head_dim = tformer.BlockConfig(d_model=6, n_heads=4, head_dim=2, d_ff=8, norm="powernorm")
    block = tformer.EncoderBlock(with_head_dim)  # was: ValueError from PowerNorm, group_num=4 vs d_model=6
    assert block.attn_residual.norm.group_num == 1
    assert tformer.EncoderBlock(cfg(norm="powernorm")).attn_residual.norm.group_num == 2  # one group per head
    with pytest.raises(ConfigError, match=r"group_num=3 \(a PowerNorm option, norm_options\) must be 0 \(off\) or an "
                                          r"int that divides d_model=8"):
        tformer.EncoderBlock(cfg(norm="powernorm", norm_options={"group_num": 3}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scalenorm_maps_a_zero_token_to_zero_in_half_precision(dtype):
    norm = tformer.make_norm("scalenorm", D).to(dtype)
    x = torch.zeros(2, 3, D, dtype=dtype)
    x[0, 0] = 1.0
    y = norm(x)  # was: NaN (sqrt(d) / eps overflows float16, 0 * inf)
    assert bool(torch.isfinite(y).all()) and not y[1].any()
    torch.testing.assert_close(y.float(), norm.float()(x.float()), atol=1e-2, rtol=1e-2)


def test_xformers_where_it_cannot_run_is_a_config_error_and_a_runtime_error():
    block = tformer.EncoderBlock(cfg(attention="xformers"))
    with pytest.raises(ConfigError, match=r"attention='xformers' cannot run: .*Use attention='auto' or 'sdpa'") as error:
        block(torch.randn(1, 2, D))
    assert isinstance(error.value, RuntimeError)  # what it was before, for existing handlers


def test_rmsnorm_maps_a_zero_token_to_zero_in_float16_with_a_tiny_eps():
    # found by tests/test_properties.py (slow profile): 1 / sqrt(1e-12) = 1e6 passes fp16's largest value,
    # and 0 * inf made the zero token NaN; the scale is applied in float32 before the cast
    norm = tformer.make_norm("rmsnorm", 4, eps=1e-12).half()
    x = torch.zeros(2, 3, 4, dtype=torch.float16)
    x[0, 0] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    y = norm(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(3, 4, dtype=torch.float16))
    expected = (x[0, 0].double() / x[0, 0].double().pow(2).mean().sqrt())
    torch.testing.assert_close(y[0, 0].double(), expected, rtol=2e-3, atol=2e-3)


def test_generate_with_an_eos_id_outside_the_vocabulary_needs_no_pad_id():
    # a converted HF config can carry eos 50256 on a small test vocabulary: no row can end, so no pad is fed back
    torch.manual_seed(0)
    lm = tformer.LanguageModel(tformer.BlockConfig(d_model=16, n_heads=2, d_ff=32), vocab_size=60, n_layers=1,
                               max_seq_len=32)
    lm.eos_token_id = 50256
    out = lm.generate(torch.randint(0, 60, (2, 3)), 4, temperature=0)
    assert out.shape == (2, 7) and int(out.max()) < 60
    lm.eos_token_id = 5
    with pytest.raises(ValueError, match="pad_token_id"):
        lm.generate(torch.randint(0, 60, (2, 3)), 4, temperature=0, pad_token_id=60)
