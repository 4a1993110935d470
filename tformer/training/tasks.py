"""What is trained: the language-model and sequence-to-sequence tasks, and the token loss they share.

A task builds its model from the recipe config, hands out batch ``step`` (a function of
``(seed, step)``, this process's slice of the global batch), computes the loss, counts tokens and
evaluates on its fixed validation set. ``lm_loss`` is the next-token cross-entropy used by the
training loop, ``tformer analyze scales`` and the reproductions alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import MultiHeadAttention
from ..config import BlockConfig, check_positive_int
from ..data import LMBatches, Seq2SeqTask, eval_windows
from ..tokenization import lm_token_splits
from ..errors import ConfigError
from ..models import EncoderDecoder, LanguageModel
from .distributed import Dist
from .engine import check_grad_accum


def token_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over every target token (in fp32), skipping ``ignore_index``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token loss of a language model on ``(inputs, targets)``, as ``LMBatches`` yields them."""
    inputs, targets = batch
    return token_loss(model(inputs), targets)


def _val_metrics(loss: float) -> dict:
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


HF_PREFIX = "hf:"


def step_batch_size(train: dict, world: Dist) -> int:
    """Sequences per optimizer step over all processes: ``batch_size * grad_accum``, where ``batch_size``
    is one forward/backward over all processes (so it must split evenly over them)."""
    batch_size, accum = train["batch_size"], train["grad_accum"]
    check_positive_int("train.batch_size", batch_size)
    check_grad_accum(accum)
    if batch_size % world.world_size:
        raise ConfigError(f"train.batch_size={batch_size} (one forward/backward over all processes) must divide evenly "
                          f"over {world.world_size} processes")
    return batch_size * accum


def _load_hf_causal_lm(source: str, key: str) -> nn.Module:
    """``from_hf`` of the Hugging Face causal LM saved in ``source`` (a directory of ``save_pretrained``, or a
    hub id when the hub is reachable), in float32; any failure as a ``ConfigError`` naming ``key``."""
    try:
        import transformers
    except ImportError as error:
        raise ConfigError(f"model.init_from={key!r} needs Hugging Face transformers: pip install \"tformer[hf]\"") \
            from error
    from ..hf import from_hf

    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"model.init_from={key!r}: Hugging Face could not load a causal LM from {source!r}: "
                          f"{error}") from error
    return from_hf(hf_model)


class LanguageModelTask:
    """Language modelling on the embedded corpus, a user's text file or a prepared token directory, with
    the byte tokenizer or a BPE (``tformer.tokenization``); evaluation reports bits per byte as well."""

    def __init__(self, config: dict, world: Dist, device: torch.device):
        data = config["data"]
        run_dir = Path(config["out_dir"]) / config["run"]
        self.tokenizer, train_tokens, val_tokens = lm_token_splits(data, run_dir, world.is_main)
        self.seq_len = data["seq_len"]
        self.init_from = config["model"]["init_from"]
        max_seq_len = config["model"]["max_seq_len"]
        self._start: LanguageModel | None = None
        if self.init_from:
            self._start = self._initial_model()
            spec = self._start.spec
            max_seq_len = spec.max_seq_len
            if spec.vocab_size != self.tokenizer.vocab_size:
                raise ConfigError(
                    f"model.init_from={self.init_from!r} has vocab_size={spec.vocab_size}, but the data's tokenizer "
                    f"(data.tokenizer={self.tokenizer.name}) has {self.tokenizer.vocab_size} ids: a model trained with "
                    f"another tokenizer needs that tokenizer, which recipes read only as their own BPE"
                )
        if self.seq_len > max_seq_len:
            raise ConfigError(f"data.seq_len={self.seq_len} exceeds the model's max_seq_len={max_seq_len}")
        self.batches = LMBatches(train_tokens, step_batch_size(config["train"], world), self.seq_len, config["seed"],
                                 world.rank, world.world_size)
        self.val = eval_windows(val_tokens, self.seq_len, data["eval_windows"])
        self.val_bytes = self.tokenizer.token_bytes(self.val[1])
        self.config, self.device = config, device

    def _initial_model(self) -> LanguageModel:
        from ..checkpoint import load

        if self.init_from.startswith(HF_PREFIX):
            model = _load_hf_causal_lm(self.init_from.removeprefix(HF_PREFIX), self.init_from)
        else:
            model = load(self.init_from, dtype=torch.float32)  # trains in float32; CheckpointError names a bad file
        if not isinstance(model, LanguageModel):
            raise ConfigError(f"model.init_from={self.init_from!r} holds a {type(model).__name__}; an LM recipe "
                              f"starts from a LanguageModel checkpoint")
        return model

    def build_model(self) -> nn.Module:
        """The recipe's model, or with ``model.init_from`` that checkpoint's model and weights (its
        architecture wins: the other ``model.*`` keys are not used)."""
        if self.init_from:
            model, self._start = self._start or self._initial_model(), None
            return model.train()
        m = self.config["model"]
        return LanguageModel(BlockConfig(**m["block"]), m["n_layers"], self.tokenizer.vocab_size, m["max_seq_len"],
                             positions=m["positions"], tie_embeddings=m["tie_embeddings"])

    def batch(self, step: int) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device) for t in self.batches.batch(step))

    def loss(self, model: nn.Module, batch) -> Tensor:
        return lm_loss(model, batch)

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def loss_tokens(self, batch) -> int:
        """How many target tokens ``loss`` averages over (weights micro-batches under accumulation)."""
        return batch[1].numel()

    def flops_per_token(self, model: nn.Module) -> float:
        """Model FLOPs of one training token (forward + backward, PaLM's appendix B): ``6 N`` for the ``N``
        weights of the matrix multiplies (projections, feed-forward, LM head) plus ``12 L d_attn T`` for
        attention's scores and weighted sums over a context of ``T = seq_len``. Recomputation (activation
        checkpointing) is not counted: this is model FLOPs utilization, not hardware utilization."""
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        attention = sum(12 * layer.q_size * self.seq_len for layer in layers)
        return 6.0 * matmul + attention

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        inputs, targets = (t.to(self.device) for t in self.val)
        total = 0.0
        for i in range(0, len(inputs), 16):
            total += self.loss(model, (inputs[i : i + 16], targets[i : i + 16])).item() * len(inputs[i : i + 16])
        metrics = _val_metrics(total / len(inputs))
        # summed nats over the validation targets / (ln 2 x the bytes they cover): comparable across tokenizers
        metrics["bits_per_byte"] = total * targets.shape[1] / (math.log(2) * self.val_bytes)
        return metrics


class SequenceToSequenceTask:
    """Copy / reverse / sort with an encoder-decoder; exact match by greedy decoding."""

    def __init__(self, config: dict, world: Dist, device: torch.device):
        data = config["data"]
        self.data = Seq2SeqTask(data["task"], data["vocab_size"], data["min_len"], data["max_len"],
                                step_batch_size(config["train"], world), config["seed"], world.rank, world.world_size)
        self.val = self.data.validation(data["eval_examples"])
        self.config, self.device = config, device

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return EncoderDecoder(BlockConfig(**m["block"]), m["n_encoder_layers"], m["n_decoder_layers"],
                              self.data.vocab_size, max_seq_len=self.data.max_seq_len, positions=m["positions"],
                              tie_embeddings=m["tie_embeddings"])

    def batch(self, step: int) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device) for t in self.data.batch(step))

    def loss(self, model: nn.Module, batch) -> Tensor:
        src, tgt_in, tgt_out, src_pad, tgt_pad = batch
        logits = model(src, tgt_in, src_padding_mask=src_pad, tgt_padding_mask=tgt_pad)
        return token_loss(logits, tgt_out, ignore_index=self.data.PAD)

    def tokens(self, batch) -> int:
        return int((~batch[4]).sum()) + int((~batch[3]).sum())

    def loss_tokens(self, batch) -> int:
        return int((~batch[4]).sum())

    def flops_per_token(self, model: nn.Module) -> None:
        return None  # padded source and target of varying lengths: no single figure per token

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model = getattr(model, "module", model)
        src, tgt_in, tgt_out, src_pad, tgt_pad = (t.to(self.device) for t in self.val)
        loss = self.loss(model, (src, tgt_in, tgt_out, src_pad, tgt_pad)).item()
        memory = model.encode(src, src_padding_mask=src_pad)
        decoded = torch.full_like(tgt_in[:, :1], self.data.BOS)
        for _ in range(tgt_out.shape[1]):
            logits = model.decode(decoded, memory, src_padding_mask=src_pad)
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
        predicted = decoded[:, 1:].masked_fill(tgt_pad, self.data.PAD)
        exact = (predicted == tgt_out).all(1).float().mean().item()
        return {**_val_metrics(loss), "exact_match": exact}


TASKS = {"lm": LanguageModelTask, "seq2seq": SequenceToSequenceTask}
