"""Train an encoder-decoder on a synthetic task: python recipes/train_seq2seq.py [CONFIG.yaml] [key=value ...]

Runs unchanged under torchrun (torchrun --nproc_per_node=2 recipes/train_seq2seq.py ...).
"""

import sys

from tformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--task", "seq2seq", *sys.argv[1:]]))
