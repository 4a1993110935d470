"""Padded batches: packed (padding-free) stacks against the padded path and torch.nn's nested tensors.

    python benchmarks/packing.py            # B 8, S 256, d 512, 2 layers; memory at S 8192
    python benchmarks/packing.py --quick    # fewer repeats, memory at S 4096
    python benchmarks/packing.py --json

Timing: one process, candidates round-robin, medians. The batch has 50% padding: row ``i`` of ``B``
holds ``S (2i + 1) / (2B)`` real tokens (right-padded; packing does not care where padding sits).
``padded`` is the same stack with ``pack_padding = False`` (every projection, feed-forward and norm
runs on the padding too). Inference is compared with ``nn.TransformerEncoder`` (post-LN,
``enable_nested_tensor=True``: its fast path turns the padded batch into a nested tensor).

Memory: peak RSS growth of a causal decoder's forward (no grad), each configuration in a fresh
process: a one-layer stack without padding and with left padding (packed), and a lone
``DecoderBlock`` (nothing packs it) without padding, with right padding (plain ``is_causal``) and
with left padding (the ``(batch, 1, S, S)`` mask that stacks avoid).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch
from torch import nn

import tformer
from timing import add_options, medians

D, HEADS, D_FF, LAYERS = 512, 8, 2048, 2


def half_padded(batch: int, seq: int) -> torch.Tensor:
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for i in range(batch):
        pad[i, seq * (2 * i + 1) // (2 * batch):] = True
    return pad


def stacks(kind: str, placement: str = "pre"):
    cfg = tformer.BlockConfig(d_model=D, n_heads=HEADS, d_ff=D_FF, placement=placement, dropout=0.0)
    packed = (tformer.Encoder(cfg, LAYERS) if kind == "encoder"
              else tformer.Decoder(cfg, LAYERS, cross_attention=False))
    padded = copy.deepcopy(packed)
    padded.pack_padding = False
    return packed, padded


def train_step(stack, x, pad, grad):
    def run():
        leaf = x.detach().requires_grad_(True)
        stack(leaf, padding_mask=pad).backward(grad)
    return run


def no_grad(stack, x, pad):
    def run():
        with torch.no_grad():
            stack(x, padding_mask=pad)
    return run


def timings(quick: bool, batch: int = 8, seq: int = 256) -> dict:
    torch.manual_seed(0)
    repeats = 3 if quick else 9
    pad = half_padded(batch, seq)
    x, grad = torch.randn(batch, seq, D), torch.randn(batch, seq, D)
    result = {"batch": batch, "seq": seq, "real_fraction": float((~pad).float().mean())}
    for kind in ("encoder", "decoder"):
        packed, padded = stacks(kind)
        result[f"train {kind}"] = medians({"packed": train_step(packed.train(), x, pad, grad),
                                           "padded": train_step(padded.train(), x, pad, grad)}, repeats)
    post_packed, post_padded = stacks("encoder", "post")
    layer = nn.TransformerEncoderLayer(D, HEADS, D_FF, dropout=0.0, batch_first=True)
    torch_encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=True).eval()
    result["inference encoder (post-LN)"] = medians({
        "packed": no_grad(post_packed.eval(), x, pad),
        "padded": no_grad(post_padded.eval(), x, pad),
        "torch.nn nested tensor": no_grad(lambda x, padding_mask: torch_encoder(x, src_key_padding_mask=padding_mask),
                                          x, pad),
    }, repeats)
    return result


MEMORY_CHILD = r"""
import sys, torch, tformer
def peak_kb():  # this process's own peak RSS: ru_maxrss would carry over the parent's peak across exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
B, S, D, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = tformer.BlockConfig(d_model=D, n_heads=8, d_ff=4 * D)
model = (tformer.DecoderBlock(cfg, cross_attention=False) if what.startswith("block")
         else tformer.Decoder(cfg, 1, cross_attention=False)).eval()
x = torch.randn(B, S, D)
pad = torch.zeros(B, S, dtype=torch.bool)
if "right" in what:
    pad[0, S - S // 4:] = pad[-1, S - S // 8:] = True
elif "left" in what:
    pad[0, :S // 4] = pad[-1, :S // 8] = True
with torch.no_grad():
    model(x[:, :64], padding_mask=pad[:, :64])
    before = peak_kb()
    model(x, padding_mask=None if "no padding" in what else pad)
    after = peak_kb()
print((after - before) / 1024)
"""

#: (case, its baseline): a stack packs any padding; a lone block (no stack to pack) runs right padding as
#: plain causal attention and needs a (batch, 1, S, S) mask only for other padding
MEMORY_CASES = {"stack, no padding": None, "stack, left padding (packed)": "stack, no padding",
                "block, no padding": None, "block, right padding (is_causal)": "block, no padding",
                "block, left padding (mask)": "block, no padding"}


#: every block over 64 KiB a fresh mmap: without it glibc's adaptive threshold serves some large tensors
#: from heap pages touched earlier, and the peak-RSS growth varied from 5 to 321 MB between identical runs
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def memory(quick: bool, batch: int = 4) -> dict:
    seq = 4096 if quick else 8192
    out = {"batch": batch, "seq": seq, "d_model": D}
    for what in MEMORY_CASES:
        run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(batch), str(seq), str(D), what],
                             capture_output=True, text=True, check=True, env=MALLOC_ENV)
        out[what] = float(run.stdout.split()[-1])
    return out


def section(quick: bool) -> tuple[list[str], list[str]]:
    t, m = timings(quick), memory(quick)
    lines = [f"Padded batches (`python benchmarks/packing.py`): {LAYERS}-layer Pre-LN stacks, d {D}, {HEADS} heads, "
             f"d_ff {D_FF}, batch {t['batch']} x {t['seq']} with {1 - t['real_fraction']:.0%} padding; `padded` is the "
             "same stack with `pack_padding = False`:", "",
             "| step | candidate | ms | / padded |", "|---|---|---|---|"]
    verdicts = []
    for step in ("train encoder", "train decoder", "inference encoder (post-LN)"):
        row = t[step]
        lines += [f"| {step} | {name} | {s * 1e3:.1f} | {s / row['padded']:.2f} |" for name, s in row.items()]
        ratio = row["packed"] / row["padded"]
        verdicts.append(f"{'met' if ratio <= 0.6 else 'NOT met'}: {step} step on a batch with 50% padding, packed "
                        f"{ratio:.2f}x the padded time (target <= 0.6x)")
    inference = t["inference encoder (post-LN)"]
    vs_torch = inference["packed"] / inference["torch.nn nested tensor"]
    verdicts.append(f"{'met' if vs_torch <= 1.0 else 'NOT met'}: padded-batch inference, packed post-LN encoder "
                    f"{vs_torch:.2f}x the time of torch.nn.TransformerEncoder's nested-tensor fast path (target <= 1.0x)")
    lines += ["", f"Peak extra memory of a causal decoder forward (no grad), batch {m['batch']} x {m['seq']}, d {D}, "
              "each in a fresh process (a quarter of one row and an eighth of another padded):", "",
              "| input | MB | / the same without padding |", "|---|---|---|"]
    lines += [f"| {what} | {m[what]:.0f} | {m[what] / max(m[base], 1.0):.2f} |" if base else f"| {what} | {m[what]:.0f} | |"
              for what, base in MEMORY_CASES.items()]
    ratios = {what: m[what] / max(m[base], 1.0) for what, base in MEMORY_CASES.items() if base}
    worst = max(ratios["stack, left padding (packed)"], ratios["block, right padding (is_causal)"])
    verdicts.append(f"{'met' if worst <= 1.5 else 'NOT met'}: causal attention with padding at S={m['seq']} within "
                    f"{worst:.2f}x the memory of causal alone, packed stack or right-padded block (target <= 1.5x; "
                    f"a lone block's left-padding mask: {ratios['block, left padding (mask)']:.1f}x)")
    return lines + [""], verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_options(parser, threads=False).parse_args()
    if args.json:
        print(json.dumps({"timings": timings(args.quick), "memory": memory(args.quick)}, indent=1))
        return
    lines, verdicts = section(args.quick)
    print("\n".join(lines + verdicts))


if __name__ == "__main__":
    main()
