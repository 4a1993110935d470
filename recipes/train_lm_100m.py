"""The ~100M-parameter recipe (recipes/configs/lm_100m.yaml): python recipes/train_lm_100m.py [--quick] [key=value ...]

On GPUs: torchrun --nproc_per_node=8 recipes/train_lm_100m.py data.path=<tformer prepare directory>.

``--quick`` runs the same model for 3 small steps on a CPU (about a minute on 2 cores): batch 2 x grad_accum 2
of 128 tokens, a 4096-id BPE trained on the embedded corpus, activation checkpointing on, and float32 and no
compile, because on a CPU without AVX-512 BF16 (this project's 2-core CI machine) bfloat16 matrix multiplies
run about 60x slower than float32 ones, and compiling 12 blocks cold takes minutes. Any key=value after it
still wins.
"""

import sys
from pathlib import Path

from tformer.cli import main

CONFIG = Path(__file__).resolve().parent / "configs" / "lm_100m.yaml"
QUICK = ["run=lm_100m_quick", "train.steps=3", "train.batch_size=2", "train.grad_accum=2", "train.warmup_steps=1",
         "train.precision=fp32", "train.compile=false", "data.seq_len=128", "data.vocab_size=4096",
         "data.eval_windows=2", "log.every=1", "log.eval_every=3", "log.checkpoint_every=3"]

if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "--quick" in args
    args = [a for a in args if a != "--quick"]
    sys.exit(main(["train", "--task", "lm", str(CONFIG), *(QUICK if quick else []), *args]))
