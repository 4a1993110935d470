"""Exact LayerNorm -> RMSNorm conversion of Pre-LN models (Jiang et al. 2023, arXiv 2305.14858).

``layernorm_to_rmsnorm(model)`` returns a new model (the input is left unchanged) in which every
LayerNorm on the residual stream of a Pre-LN ``LanguageModel``, ``EncoderDecoder`` or
``EncoderModel`` is an RMSNorm with the same eps, and whose outputs equal the input model's (float
rounding: about 1e-6 relative in float32, 1e-15 in float64). It is a normal tformer model built from
``dataclasses.replace(cfg, norm="rmsnorm", ...)`` with the converted weights, so its ``spec`` says
what it is and ``tformer.save`` / ``tformer.load`` round-trip it.

Why it is exact ("Pre-RMSNorm" of the paper):

1. In a Pre-LN model everything that reads the residual stream is a LayerNorm (each sublayer's
   input norm, the stack's final norm), and LayerNorm ignores the stream's per-token mean. So the
   conversion re-centers every weight that writes into the stream, ``W <- (I - 11^T/d) W`` and
   ``b <- b - mean(b)``: token-embedding rows (and token-type rows), additive position tables,
   attention output projections (``attn.out``, ``cross_attn.out``), feed-forward outputs
   (``ffn.w2``). The stream is then zero-mean per token, and no LayerNorm sees a difference.
2. On a zero-mean ``x``, ``LayerNorm(x) = g * x / sqrt(mean(x^2) + eps) + b = RMSNorm_g(x) + b``.
3. The shift ``b`` folds into the linear layers that read the norm's output: ``W (c y + c b) + a
   = W (c y) + (a + c W b)`` for the queries/keys/values (``qkv``; cross-attention's ``q``), the
   feed-forward's ``w1`` (and ``w3`` when gated), the LM head (reads the decoder's final norm)
   and, in an encoder-decoder, every decoder layer's cross-attention ``kv`` (reads the encoder's
   final norm through the memory). ``c`` is the constant a placement scales the norm's output
   by (LayerNorm scaling's ``1/sqrt(l)``; 1 for Pre-LN). An ``EncoderModel`` has no head: its
   output is its final norm's output, so that norm's bias has nowhere to go and must be zero
   (e.g. ``norm_bias=False``), and it keeps its gain under ``fold_gain``.

Consequences for the converted model's spec (each change is what the weights need, nothing else):
``norm="rmsnorm"`` (``norm_bias=False``: RMSNorm has none; ``norm_eps`` the LayerNorm's); when the
LayerNorms have a bias, ``attn_bias=True`` and ``ffn_bias=True`` (the readers need one; biases
that had no counterpart start at zero) and ``head_bias=True``;
``tie_embeddings=False`` (the input embedding is re-centered, the head keeps the original rows);
additive positions become ``positions="learned"`` holding the re-centered table (sinusoidal
positions are a fixed buffer, and their rows are not zero-mean); rotary positions (``rope``) add
nothing to the stream and stay as they are. ``fold_gain=True`` also multiplies each RMSNorm's gain
into its readers and leaves unit gains (the paper's parameter-free Pre-RMSNorm; in tformer it
costs the same, RMSNorm multiplies by its weight either way). Compressed RMSNorm (CRMSNorm,
``d - 1`` dimensions) is not implemented.

Equality holds in eval mode, and in training mode when ``dropout == 0``: the embedding and
residual-branch dropouts rescale single elements, which breaks the per-token zero mean, so with
dropout the converted model trains as a (slightly) different model. Attention dropout and the
feed-forward's inner dropout are before a re-centered projection and do not matter.

What it refuses, with a ``ConfigError`` saying why: placements other than pre-style ones
(``x <- x + F(c * Norm(x))``: ``pre``, ``lnscaling``, ``mixln`` when every layer is pre), norms
other than LayerNorm (a model whose norms are all RMSNorm is returned as an equivalent copy), a
mix of LayerNorm and RMSNorm, sublayers other than tformer's ``MultiHeadAttention`` and
``FeedForward`` (it must know which linear layers read and write), and bare stacks and blocks
(their input comes from the caller, and the first LayerNorm reads it). A placement is classified
by running a copy of it once on a probe input, not by its name, so a custom placement converts
when it behaves as a pre-style one.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .blocks import TransformerBlock
from .errors import ConfigError
from .feedforward import FeedForward
from .models import EncoderDecoder, EncoderModel, LanguageModel
from .norms import TokenwiseNorm
from .placements import ResidualPlacement
from .rmsnorm import RMSNorm
from .stacks import Decoder, Encoder

__all__ = ["layernorm_to_rmsnorm"]

PRE_STYLE = "x <- x + F(c * Norm(x))"


@dataclass
class StreamNorm:
    """One norm that reads the residual stream: where it is, and the linear layers that read its output.

    The readers see ``scale * Norm(x)``; ``path`` and ``readers`` are module paths in the model. No
    readers: the norm's output is the model's output (``EncoderModel``'s last hidden state).
    """

    path: str
    scale: float
    readers: tuple[str, ...]


@dataclass
class Plan:
    """What converting one model touches: its stream norms, and the linear layers and embeddings that
    write into its residual streams (module paths)."""

    norms: list[StreamNorm]
    writers: list[str]
    embeddings: list[str]


def layernorm_to_rmsnorm(model: nn.Module, *, fold_gain: bool = False) -> nn.Module:
    """A new model equal to the Pre-LN ``model`` in which every LayerNorm is an RMSNorm.

    ``model`` is a ``LanguageModel``, ``EncoderDecoder`` or ``EncoderModel`` whose residual stream is read only
    through pre-style norms (placements ``pre``, ``lnscaling``, ``mixln`` without post layers),
    all LayerNorm; it is not modified. The result has the same outputs (eval mode, or dropout 0),
    dtype, device, train/eval mode and ``requires_grad`` flags, and a spec that describes it (see
    the module docstring for what changes). A model whose norms are all RMSNorm comes back as an
    equivalent copy. ``fold_gain=True`` also folds each norm's gain into the linear layers that
    read it, leaving RMSNorms of unit gain. Anything that cannot be converted exactly raises
    ``tformer.ConfigError`` saying why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layernorm_to_rmsnorm takes a tformer model (nn.Module), got {type(model).__name__}")
    if not isinstance(fold_gain, bool):
        raise ConfigError(f"fold_gain={fold_gain!r} must be True or False")
    plan = _plan(model)
    kinds = {s.path: _norm_kind(_unwrap(model.get_submodule(s.path))) for s in plan.norms}
    if set(kinds.values()) == {"rmsnorm"}:
        return copy.deepcopy(model)
    if "rmsnorm" in kinds.values():
        ln = [p for p, k in kinds.items() if k == "layernorm"]
        rms = [p for p, k in kinds.items() if k == "rmsnorm"]
        raise ConfigError(
            f"the model mixes LayerNorm ({_some(ln)}) and RMSNorm ({_some(rms)}) on its residual stream: "
            f"an RMSNorm reads the stream's per-token mean, which the conversion removes from the stream to make "
            f"LayerNorm equal RMSNorm, so no exact conversion exists; give every stream norm the same kind"
        )
    return _convert(model, plan, fold_gain)


# ---------------------------------------------------------------------------------------------------------------
# What a model is made of


def _plan(model: nn.Module) -> Plan:
    """The model's stream norms, writers and embeddings; raises ``ConfigError`` for what cannot convert."""
    if isinstance(model, (Encoder, Decoder, TransformerBlock)):
        kind = "stack" if isinstance(model, (Encoder, Decoder)) else "block"
        raise ConfigError(
            f"layernorm_to_rmsnorm converts whole models (LanguageModel, EncoderModel, EncoderDecoder), not a bare "
            f"{type(model).__name__}: "
            f"the conversion makes the residual stream zero-mean per token by re-centering every weight that writes "
            f"into it, but a {kind}'s input x comes from its caller and its first LayerNorm reads x itself; RMSNorm "
            f"equals LayerNorm only on zero-mean input, and no weight inside the {kind} makes the caller's x "
            f"zero-mean. Convert the model that owns the embeddings instead"
        )
    # Per stack: (the linear layers that read its output, what they are, for messages)
    if isinstance(model, LanguageModel):
        stacks, embeddings = {"decoder": model.decoder}, ["embedding"]
        final_readers = {"decoder": (("head",), "the LM head")}
    elif isinstance(model, EncoderModel):
        stacks, embeddings = {"encoder": model.encoder}, ["embedding"]
        final_readers = {"encoder": ((), "the model's output")}
    elif isinstance(model, EncoderDecoder):
        stacks, embeddings = {"encoder": model.encoder, "decoder": model.decoder}, ["src_embedding", "tgt_embedding"]
        kv = tuple(f"decoder.layers.{i}.cross_attn.kv" for i, block in enumerate(model.decoder.layers)
                   if "cross_attn" in block.sublayer_names)
        final_readers = {"encoder": (kv, "every cross-attention's keys and values"),
                         "decoder": (("head",), "the LM head")}
    else:
        raise ConfigError(
            f"layernorm_to_rmsnorm converts tformer's LanguageModel, EncoderModel and EncoderDecoder; got "
            f"{type(model).__name__} (tformer.from_torch turns torch.nn Transformer layers into tformer blocks)"
        )
    if getattr(model, "spec", None) is None:
        raise ConfigError(f"this {type(model).__name__} has no spec to build the converted model from")
    d_model = model.spec.cfg.d_model
    for path in embeddings:
        if getattr(model.get_submodule(path), "norm", None) is not None:
            raise ConfigError(
                f"{path} normalizes the embeddings (BERT's embedding norm), so the residual stream starts as that "
                f"norm's output, whose per-token mean (mean(g * xhat) + mean(b)) is not a weight that could be "
                f"re-centered; no exact conversion exists"
            )
    norms, writers = [], []
    for stack_name, stack in stacks.items():
        for i, block in enumerate(stack.layers):
            for name, (sublayer, placement) in block.residual_sublayers().items():
                where = f"{stack_name}.layers.{i}.{name}_residual"
                configured = block.cfg.placement if block.cfg is not None else None
                attr, scale = _probe_placement(placement, d_model, where, configured)
                readers, writer = _sublayer_linears(sublayer, f"{stack_name}.layers.{i}.{name}")
                norms.append(StreamNorm(f"{where}.{attr}", scale, readers))
                writers.append(writer)
        path = f"{stack_name}.final_norm"
        readers, what = final_readers[stack_name]
        if stack.final_norm is None:
            raise ConfigError(
                f"the {stack_name} has no final norm (final_norm=False), so its output is the raw residual stream "
                f"and the stream's per-token mean reaches {what}; re-centering the stream would change the outputs"
            )
        _probe_end(stack.layers[-1], d_model, stack_name)
        norms.append(StreamNorm(path, 1.0, readers))
    for s in norms:
        norm = _unwrap(model.get_submodule(s.path))
        kind = _norm_kind(norm)
        if kind == "other":
            raise ConfigError(
                f"{s.path} is a {type(norm).__name__}, not a LayerNorm: only LayerNorm ignores the residual stream's "
                f"per-token mean, which is what makes replacing it by RMSNorm exact (norms other than LayerNorm, such "
                f"as PowerNorm, ScaleNorm, DyT or none, have no exact RMSNorm equivalent)"
            )
        shape = tuple(getattr(norm, "normalized_shape", None) or norm.weight.shape)
        if shape != (d_model,):
            raise ConfigError(f"{s.path} normalizes over {shape}, not the last dimension (d_model={d_model})")
    for path in (r for s in norms for r in s.readers):
        if not isinstance(model.get_submodule(path), nn.Linear):
            raise ConfigError(f"{path} is a {type(model.get_submodule(path)).__name__}, not the nn.Linear it expected")
    return Plan(norms, writers, embeddings)


def _sublayer_linears(sublayer: nn.Module, path: str) -> tuple[tuple[str, ...], str]:
    """(the linear layers that read a sublayer's input, the one that writes its output), as module paths."""
    if isinstance(sublayer, MultiHeadAttention):
        return ((f"{path}.q",) if sublayer.cross else (f"{path}.qkv",)), f"{path}.out"
    if isinstance(sublayer, FeedForward):
        readers = (f"{path}.w1",) + ((f"{path}.w3",) if sublayer.w3 is not None else ())
        return readers, f"{path}.w2"
    raise ConfigError(
        f"{path} ({type(sublayer).__name__}) is not tformer's MultiHeadAttention or FeedForward: layernorm_to_rmsnorm "
        f"knows which linear layers of those read the norm's output and write into the residual stream, not of "
        f"other modules"
    )


def _unwrap(norm: nn.Module) -> nn.Module:
    return norm.norm if isinstance(norm, TokenwiseNorm) else norm


def _norm_kind(norm: nn.Module) -> str:
    if isinstance(norm, nn.LayerNorm):
        return "layernorm"
    if isinstance(norm, (RMSNorm, nn.RMSNorm)):
        return "rmsnorm"
    return "other"


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


# ---------------------------------------------------------------------------------------------------------------
# Classifying placements by what they do


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-9 * (1.0 + float(b.abs().max())))


def _probe_input(d_model: int) -> tuple[Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, d_model, dtype=torch.float64, generator=generator)
    return x + 2.0 * torch.randn(2, 3, 1, dtype=torch.float64, generator=generator), generator  # nonzero means


def _probe_placement(placement: ResidualPlacement, d_model: int, where: str, configured) -> tuple[str, float]:
    """``(attribute of the norm that reads the stream, c)`` for a placement computing ``x + F(c * Norm(x))``.

    Runs a float64 eval-mode copy of the placement once with a random linear ``F`` and records what
    each of its child modules and ``F`` read and return; anything else raises ``ConfigError`` naming
    what the placement does instead.
    """
    name = getattr(placement, "name", "") or type(placement).__name__
    formula = getattr(placement, "formula", "")
    label = f"placement {name!r}" + (f" ({formula})" if formula else "")
    if isinstance(configured, str) and configured != name:
        label += f", which placement {configured!r} runs in this layer"
    stream = getattr(placement, "stream", "tensor")
    if stream != "tensor":
        raise ConfigError(
            f"{where}: stack-level {label} carries a residual stream of more than one tensor ({stream!r}), and its "
            f"norms read more than one stream's x (e.g. x_a + F(x_a) in ResiDual's post-style stream, learned mixes "
            f"of streams in hyper-connections, whose dynamic weights read a norm's output through tanh), so the "
            f"stream's mean reaches outputs that re-centered weights would change; only pre-style placements "
            f"({PRE_STYLE}) convert exactly"
        )
    probe = copy.deepcopy(placement).to("cpu", torch.float64).eval()
    children = {n: m for n, m in probe.named_children() if not isinstance(m, nn.Dropout)}
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in children}

    def record(child: str):
        def hook(module, args, kwargs, output):
            first = args[0] if args else next(iter(kwargs.values()))
            calls[child].append((first, output))
        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in children.items()]
    x, generator = _probe_input(d_model)
    weight = torch.randn(d_model, d_model, dtype=torch.float64, generator=generator) / d_model**0.5
    shift = torch.randn(d_model, dtype=torch.float64, generator=generator)
    branch: list[tuple[Tensor, Tensor]] = []

    def sublayer(h: Tensor) -> Tensor:
        y = h @ weight.T + shift
        branch.append((h, y))
        return y

    try:
        with torch.no_grad():
            out = probe(x, sublayer, None)
    finally:
        for handle in handles:
            handle.remove()
    used = [n for n in children if calls[n]]
    if not used:
        raise ConfigError(
            f"{where}: {label} applies no norm: its sublayer reads the residual stream x directly, so the stream's "
            f"per-token mean reaches the sublayer's linear layers and re-centering the stream would change them; "
            f"only pre-style placements ({PRE_STYLE}) convert exactly"
        )
    if len(used) == 1 and len(calls[used[0]]) == 1 and len(branch) == 1 and isinstance(out, Tensor):
        (norm_in, norm_out), (h, y) = calls[used[0]][0], branch[0]
        c = float((h * norm_out).sum() / (norm_out * norm_out).sum())
        reads_stream = norm_in is x or _close(norm_in, x)
        if reads_stream and _close(h, c * norm_out) and _close(out, x + y) and c != 0.0:
            return used[0], c
    last_in, last_out = calls[used[-1]][-1]
    if isinstance(out, Tensor) and _close(out, last_out) and branch:
        y = branch[-1][1]
        alpha = float(((last_in - y) * x).sum() / (x * x).sum())
        reads = "the sum of the stream and the branch"
        if _close(last_in, alpha * x + y):
            reads = "x + F(x)" if abs(alpha - 1.0) < 1e-12 else f"{alpha:.4g} * x + F(x)"
        raise ConfigError(
            f"{where}: post-style {label}: the norm reads {reads} and its output becomes the residual stream, so "
            f"the stream's per-token mean (the norm's own mean(g * xhat) + mean(b), not a weight that could be "
            f"re-centered) reaches every later norm; only pre-style placements ({PRE_STYLE}) convert exactly"
        )
    if isinstance(out, Tensor) and any(_close(out - x, o) for n in used for _, o in calls[n]):
        raise ConfigError(
            f"{where}: {label} adds a norm's output to the residual stream, so the stream's per-token mean (that "
            f"norm's mean(g * xhat) + mean(b), not a weight that could be re-centered) reaches every later norm; "
            f"only pre-style placements ({PRE_STYLE}) convert exactly"
        )
    raise ConfigError(
        f"{where}: {label} is not pre-style: converting LayerNorm to RMSNorm exactly needs every sublayer to compute "
        f"{PRE_STYLE} with the norm reading the stream x itself and only the sublayer reading the norm's output"
    )


def _probe_end(block: TransformerBlock, d_model: int, stack: str) -> None:
    """Check that the stack's output is its final norm applied to the stream (one-tensor placements do that)."""
    x, _ = _probe_input(d_model)
    stream = block.begin(x)
    seen = []

    def final_norm(t, padding_mask=None):
        seen.append(t)
        return 2.0 * t

    out = block.end(stream, final_norm, None) if isinstance(stream, Tensor) and _close(stream, x) else None
    if out is None or len(seen) != 1 or not _close(seen[0], x) or not _close(out, 2.0 * x):
        raise ConfigError(f"the {stack}'s last placement does not end the stack with its final norm applied to the "
                          f"residual stream, so the stream's mean may reach the {stack}'s output")


# ---------------------------------------------------------------------------------------------------------------
# Building the converted model


def _additive(embedding: nn.Module) -> bool:
    """Whether an embedding's positions add a table to the stream (learned, sinusoidal); rotary ones do not."""
    positions = getattr(embedding, "positions", None)
    return positions is not None and not getattr(positions, "rotary", False)


def _center(t: Tensor, dim: int) -> Tensor:
    return t - t.mean(dim, keepdim=True)


def _convert(model: nn.Module, plan: Plan, fold_gain: bool) -> nn.Module:
    spec, cfg = model.spec, model.spec.cfg
    lns = {s.path: _unwrap(model.get_submodule(s.path)) for s in plan.norms}
    eps = {float(norm.eps) for norm in lns.values()}
    if len(eps) != 1:
        raise ConfigError(f"the model's LayerNorms have different eps ({sorted(eps)}); a tformer model has one "
                          f"norm_eps")
    biased = any(norm.bias is not None for norm in lns.values())
    changes = {"norm": "rmsnorm", "norm_options": {}, "norm_eps": eps.pop(), "norm_bias": False}
    if biased and not cfg.use_attn_bias:
        changes["attn_bias"] = True
    if biased and not cfg.use_ffn_bias:
        changes["ffn_bias"] = True
    fields = {f.name for f in dataclasses.fields(spec)}
    spec_changes = {"cfg": dataclasses.replace(cfg, **changes)}
    if "tie_embeddings" in fields:
        spec_changes["tie_embeddings"] = False
    if any(_additive(model.get_submodule(p)) for p in plan.embeddings):
        spec_changes["positions"] = "learned"
    for s in plan.norms:
        shift = lns[s.path].bias
        if shift is None or not bool((shift != 0).any()):
            continue
        if not s.readers:
            raise ConfigError(
                f"{s.path} has a nonzero bias b and its output is the model's output (no linear layer reads it that "
                f"b could fold into), and an RMSNorm has no bias; the model converts exactly when that bias is zero"
            )
    head = [s for s in plan.norms if s.readers == ("head",)]
    if head and lns[head[0].path].bias is not None and model.head.bias is None:
        spec_changes["head_bias"] = True
    new_spec = dataclasses.replace(spec, **spec_changes)
    with torch.random.fork_rng(devices=[]):  # building initializes weights; leave the caller's RNG alone
        new = type(model).from_spec(new_spec)
    new.to(torch.float64)
    _copy_weights(model, new, plan)
    with torch.no_grad():
        _recenter(model, new, plan)
        _fold(new, plan, lns, fold_gain)
    return _finish(model, new)


def _copy_weights(model: nn.Module, new: nn.Module, plan: Plan) -> None:
    """The model's weights into ``new`` (float64) by name; the new biases start at zero.

    Refuses a model whose tensors differ from what its spec builds (modified after construction).
    """
    old_state, new_state = model.state_dict(), new.state_dict()
    linears = {r for s in plan.norms for r in s.readers} | set(plan.writers)
    allowed_new = {f"{p}.bias" for p in linears} | {f"{e}.positions.weight" for e in plan.embeddings}
    norm_paths = tuple(f"{s.path}." for s in plan.norms)
    with torch.no_grad():
        for key, tensor in new_state.items():
            if key in old_state:
                if old_state[key].shape != tensor.shape:
                    raise ConfigError(f"the model's {key!r} has shape {tuple(old_state[key].shape)} where its spec "
                                      f"builds {tuple(tensor.shape)}: was the model modified after construction?")
                tensor.copy_(old_state[key])
            elif key in allowed_new:
                tensor.zero_()
            elif key.startswith(norm_paths):  # a wrapped torch norm's "norm.norm.weight": _fold sets the gains
                continue
            else:
                raise ConfigError(f"the converted model has {key!r}, which the model lacks: was the model modified "
                                  f"after construction?")
    extra = [k for k in old_state if k not in new_state and not k.startswith(norm_paths)]
    if extra:
        raise ConfigError(f"the model has {extra[0]!r}, which its spec does not build: was it modified after "
                          f"construction?")


def _recenter(model: nn.Module, new: nn.Module, plan: Plan) -> None:
    """Remove the per-token mean from everything ``new`` writes into its residual streams."""
    for path in plan.embeddings:
        old, emb = model.get_submodule(path), new.get_submodule(path)
        emb.tokens.weight.copy_(_center(emb.tokens.weight, -1))
        if getattr(emb, "token_types", None) is not None:
            emb.token_types.weight.copy_(_center(emb.token_types.weight, -1))
        if _additive(old):
            table = old.positions(old.max_seq_len, 0)
            emb.positions.weight.copy_(_center(table.to(torch.float64), -1))
    for path in plan.writers:
        linear = new.get_submodule(path)
        linear.weight.copy_(_center(linear.weight, 0))
        if linear.bias is not None:
            linear.bias.copy_(_center(linear.bias, 0))


def _fold(new: nn.Module, plan: Plan, lns: dict[str, nn.Module], fold_gain: bool) -> None:
    """Each LayerNorm's bias (and with ``fold_gain`` its gain) into the linear layers reading it."""
    for s in plan.norms:
        ln = lns[s.path]
        gain = torch.ones(ln.normalized_shape, dtype=torch.float64) if ln.weight is None else ln.weight.double()
        shift = None if ln.bias is None else ln.bias.detach().double()
        for path in s.readers:
            linear = new.get_submodule(path)
            if shift is not None:
                offset = s.scale * (linear.weight @ shift.to(linear.weight.device))
                if linear.bias is not None:
                    linear.bias.add_(offset)
                elif bool((offset != 0).any()):  # _convert refused this case already
                    raise AssertionError(f"{path} has no bias to fold {s.path}'s bias into")
            if fold_gain:
                linear.weight.mul_(gain.to(linear.weight.device))
        unit = fold_gain and s.readers  # a norm whose output is the model's output keeps its gain
        new.get_submodule(s.path).weight.copy_(torch.ones_like(gain) if unit else gain)


def _finish(model: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` on the model's device, each tensor in the dtype of the model's tensor of the same name, with the
    model's train/eval mode and ``requires_grad`` flags."""
    reference = next(model.parameters())
    old_state = model.state_dict()
    state = {k: v.to(dtype=old_state[k].dtype if k in old_state else reference.dtype, device=reference.device)
             for k, v in new.state_dict().items()}
    new.to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state, assign=True)
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    for name, param in new.named_parameters():
        if name not in flags and name.endswith(".bias"):  # a new bias follows its layer's weight
            flags[name] = flags.get(name.removesuffix(".bias") + ".weight", True)
        # a position table that was a fixed buffer (sinusoidal) stays fixed: same trainable set as the model
        param.requires_grad_(flags.get(name, not name.endswith("positions.weight")))
    return new.train(model.training)
