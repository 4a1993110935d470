"""Train a language model: python recipes/train_lm.py [CONFIG.yaml] [key=value ...]

Runs unchanged under torchrun (torchrun --nproc_per_node=2 recipes/train_lm.py ...).
"""

import sys

from tformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--task", "lm", *sys.argv[1:]]))
