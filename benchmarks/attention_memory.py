"""Peak extra memory of a padded forward pass of one block, per attention backend (CPU, no grad).

    python benchmarks/attention_memory.py                      # B=4, S=4096, d=512, sdpa and math
    python benchmarks/attention_memory.py --backends sdpa --seq 8192

Each configuration runs in a fresh subprocess; the figure is the growth of the process's peak RSS
during the forward (inputs and weights excluded), which includes the feed-forward activations.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import sys, torch, tformer
def peak_kb():  # this process's own peak RSS: ru_maxrss would carry over the parent's peak across exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
B, S, D, backend, causal = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "causal"
cfg = tformer.BlockConfig(d_model=D, n_heads=8, d_ff=4 * D, attention=backend)
block = (tformer.DecoderBlock(cfg, cross_attention=False) if causal else tformer.EncoderBlock(cfg)).eval()
x = torch.randn(B, S, D)
pad = torch.zeros(B, S, dtype=torch.bool)
pad[1, 3 * S // 4:] = True
pad[-1, S // 40:] = True
with torch.no_grad():
    block(x[:, :64], padding_mask=pad[:, :64])
    before = peak_kb()
    block(x, padding_mask=pad)
    after = peak_kb()
print((after - before) / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "math"])
    args = parser.parse_args()
    print(f"padded forward, B={args.batch}, S={args.seq}, d={args.d_model}: peak RSS growth")
    for backend in args.backends:
        for kind in ("bidirectional", "causal"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.seq), str(args.d_model),
                                  backend, kind], capture_output=True, text=True, check=True).stdout.split()[-1]
            print(f"  {backend:8s} {kind:14s} {float(out):8.0f} MB")


if __name__ == "__main__":
    main()
