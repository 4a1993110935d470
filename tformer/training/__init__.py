"""The training behind the recipes: LM and seq2seq, resumable, watchful, distributed-ready.

``train(config)`` takes a validated recipe config (``recipe_defaults(task)`` + ``load_config``) and:

* builds the model, an AdamW optimizer (no weight decay on norms, biases and scalars) and a
  warmup schedule;
* resumes from ``<out_dir>/<run>/latest.json`` when it exists (``resume: true``), restoring
  weights, optimizer, scheduler, step and RNG states, so a stopped run ends bitwise where an
  uninterrupted one would (batches are a function of ``(seed, step)``);
* shows a progress bar (loss, lr, tokens/s, ETA), writes ``metrics.jsonl``, evaluates on
  validation data (loss and perplexity; exact-match accuracy for seq2seq), checkpoints every
  ``log.checkpoint_every`` steps and at the end (0: never);
* stops at the first non-finite loss or gradient with a message naming the step, the first
  layer whose output went non-finite and the first layer whose gradients did, keeping the last
  good checkpoint;
* under ``torchrun`` wraps the model in DistributedDataParallel (gloo on CPU, nccl on CUDA); each
  process takes its slice of the same global batch and only rank 0 writes.

Checkpoints are safetensors (model, optimizer tensors, RNG states) plus JSON (step, scheduler,
optimizer settings, config): nothing is unpickled on resume.

One module per job:

* ``schema``: the recipe config's keys and defaults per task (``recipe_defaults``);
* ``tasks``: the LM and seq2seq tasks and the shared token loss (``lm_loss``);
* ``optimization``: AdamW and the learning-rate schedule;
* ``train_state``: checkpoint save / load for exact resumption;
* ``diagnosis``: where a divergence started (``TrainingDiverged``);
* ``distributed``: rank, device and process group;
* ``run_logs``: progress bar, ``metrics.jsonl``, the training monitor's files;
* ``loop``: ``train`` itself.
"""

from .diagnosis import TrainingDiverged
from .loop import RunResult, TrainingInterrupted, train
from .schema import recipe_defaults

__all__ = ["RunResult", "TrainingDiverged", "TrainingInterrupted", "recipe_defaults", "train"]
