"""Why torch.compile does not speed up a tformer block's training step on CPU: a profile, eager vs compiled.

    python benchmarks/compile_profile.py            # d 512, 8 heads, ff 2048, batch 8 x 256; ~3 minutes on 2 quiet cores
    python benchmarks/compile_profile.py --quick    # batch 4 x 128, fewer repeats and configurations
    python benchmarks/compile_profile.py --json     # machine-readable

A Pre-LN ``EncoderBlock`` (LayerNorm, sdpa attention, fp32) runs a training step (forward +
backward) eagerly and under ``torch.compile(fullgraph=True)`` with several inductor
configurations, round-robin in one process (medians; every ratio against eager measured in the
same run). ``torch.profiler`` then splits one step's self CPU time into categories, with
``torch._inductor.config.cpp.enable_kernel_profile`` so that each generated C++ kernel is an event
of its own (named after the ATen ops it fuses):

* matmul: ``aten::mm`` / ``addmm`` / ``bmm`` (MKL, through ``extern_kernels`` in the compiled graph);
* attention: SDPA's CPU flash kernels forward and backward (inductor keeps them as ATen calls) and
  the kernels inductor fuses around them;
* norm: LayerNorm forward / backward (eager's ATen kernels; inductor's fused kernels, which also
  carry the residual adds fused into them);
* elementwise: every other ATen kernel and generated kernel (relu and its backward, residual adds,
  bias-gradient sums, copies, gradient accumulation);
* other: what is left (autograd engine, the compiled graph's Python wrapper, dynamo's guards).

The matmuls and the attention kernels are the same code in both, so compile can only save from
the rest: ``eager step / (eager matmul + attention)`` bounds its speed-up. The inference table
(eval, ``no_grad``) adds ``freezing`` (weights become constants, so inductor prepacks them for
oneDNN and ``max-autotune`` may use its C++ GEMM template, which needs constant weights and so
never applies to training).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tformer
import timing

CATEGORIES = ("matmul", "attention", "norm", "elementwise", "other")
ELEMENTWISE_ATEN = ("add", "sub", "mul", "div", "relu", "clamp", "threshold", "gelu", "copy_", "cat", "sum", "fill_",
                    "zero_", "where", "mean", "neg", "exp", "rsqrt", "pow", "masked_fill", "_to_copy", "clone",
                    "contiguous", "silu", "tanh", "sigmoid")
#: training configurations: name -> (torch.compile keyword arguments, inductor config patch, functorch config patch)
TRAIN_CONFIGS = {
    "compile (default)": ({}, {}, {}),
    "mode=max-autotune": ({"mode": "max-autotune"}, {}, {}),
    "cpp_wrapper": ({}, {"cpp_wrapper": True}, {}),
    "no epilogue fusion": ({}, {"epilogue_fusion": False}, {}),
    # the partitioner then saves the relu output alone and recomputes its mask in backward (no bool tensor stored)
    "functorch recompute_views": ({}, {}, {"recompute_views": True}),
    "functorch aggressive_recomputation": ({}, {}, {"aggressive_recomputation": True}),
}
QUICK_TRAIN_CONFIGS = ("compile (default)", "functorch recompute_views")
INFER_CONFIGS = {
    "compile (default)": ({}, {}, {}),
    "freezing": ({}, {"freezing": True}, {}),
    "freezing + max-autotune": ({"mode": "max-autotune"}, {"freezing": True}, {}),
}


def category(name: str) -> str:
    """The category of one profiler event (an ATen op or an inductor-generated kernel)."""
    lowered = name.lower()
    if "scaled_dot_product" in lowered or "flash_attention" in lowered:
        return "attention"
    if "layer_norm" in lowered or "rms_norm" in lowered:
        return "norm"
    if lowered in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul") or "mkldnn" in lowered \
            or "gemm" in lowered or "mkl_linear" in lowered:
        return "matmul"
    if "cpp_fused" in lowered or "cpp_kernel" in lowered:
        return "elementwise"
    if lowered.startswith("aten::") and any(lowered[6:].startswith(op) for op in ELEMENTWISE_ATEN):
        return "elementwise"
    return "other"


def block_and_data(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    batch, seq, d = (4, 128, 512) if quick else (8, 256, 512)
    torch.manual_seed(0)
    block = tformer.EncoderBlock(tformer.BlockConfig(d_model=d, n_heads=8, d_ff=4 * d, norm="layernorm",
                                                     placement="pre", attention="sdpa"))
    return block, torch.randn(batch, seq, d), torch.randn(batch, seq, d), (batch, seq, d)


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run():
        leaf = x.detach().requires_grad_(True)
        module(leaf).backward(grad)
    return run


def infer_step(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            module(x)
    return run


def compiled_step(block: nn.Module, options: tuple[dict, dict], make_step, *args, kernel_profile: bool = False):
    """A compiled copy of ``block`` and its step function, compiled (first call) under the config patch;
    returns ``(step, compile_seconds)``."""
    kwargs, patch, functorch_patch = options
    torch._dynamo.reset()
    with inductor_config.patch({**patch, "cpp.enable_kernel_profile": kernel_profile}), \
            functorch_config.patch(functorch_patch):
        step = make_step(torch.compile(copy.deepcopy(block), fullgraph=True, **kwargs), *args)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
        seconds = time.perf_counter() - start
        step()
    return step, seconds


def medians(candidates: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each candidate run round-robin and the median per-round ratio of the first
    candidate's time to each one's (the speed-up against the first)."""
    times = timing.rounds(candidates, repeats)
    first = next(iter(candidates))
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: timing.ratio(times, first, name) for name in times})


def profile_categories(candidates: dict, windows: int, steps: int) -> tuple[dict, dict]:
    """Milliseconds per step in each category (the minimum over ``windows`` profiled windows of ``steps``
    steps, the candidates' windows interleaved) and each candidate's top events."""
    per_window = {name: [] for name in candidates}
    top = {}
    for window in range(windows):
        for name, step in candidates.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            shares = dict.fromkeys(CATEGORIES, 0.0)
            events = []
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1e3 / steps
                shares[category(event.key)] += ms
                events.append((ms, event.key))
            per_window[name].append(shares)
            if window == 0:
                top[name] = [(key, round(ms, 2), category(key)) for ms, key in sorted(events, reverse=True)[:12]]
    # the least time each category took over the windows: another process sharing the cores only ever adds time
    result = {name: {c: min(w[c] for w in rows) for c in CATEGORIES} for name, rows in per_window.items()}
    return result, top


def mask_store(quick: bool, shape: tuple[int, int]) -> dict[str, float]:
    """The relu mask alone: ``x <= 0`` into a bool tensor of the FFN's hidden shape, eager ATen against the
    kernel inductor generates for it (the same ``VecMask<float,1>`` -> bool store as in the block's
    ``cpp_fused_relu_threshold_backward`` kernel), and a float relu for scale (ms, round-robin medians)."""
    x = torch.randn(*shape)
    torch._dynamo.reset()
    compiled_le = torch.compile(lambda t: t <= 0, fullgraph=True)
    compiled_relu = torch.compile(lambda t: torch.relu(t), fullgraph=True)
    candidates = {"eager x <= 0 (bool)": lambda: x <= 0, "compiled x <= 0 (bool)": lambda: compiled_le(x),
                  "eager relu (float)": lambda: torch.relu(x), "compiled relu (float)": lambda: compiled_relu(x)}
    for fn in candidates.values():
        fn()
    ms, _ = medians(candidates, 5 if quick else 15)
    return {name: seconds * 1e3 for name, seconds in ms.items()}


def measure(quick: bool) -> dict:
    block, x, grad, (batch, seq, d) = block_and_data(quick)
    block.train()
    repeats = 5 if quick else 11
    train = {"eager": train_step(copy.deepcopy(block), x, grad)}
    compile_seconds = {}
    for name in (QUICK_TRAIN_CONFIGS if quick else TRAIN_CONFIGS):
        try:
            train[name], compile_seconds[name] = compiled_step(block, TRAIN_CONFIGS[name], train_step, x, grad)
        except Exception as error:  # a configuration that does not compile here is reported, not fatal
            compile_seconds[name] = f"failed: {type(error).__name__}"
    train_ms, train_speedup = medians(train, repeats)

    # the profile: eager against the default compile, rebuilt with one profiler event per generated kernel
    profiled = {"eager": train["eager"],
                "compiled": compiled_step(block, TRAIN_CONFIGS["compile (default)"], train_step, x, grad,
                                          kernel_profile=True)[0]}
    categories, top = profile_categories(profiled, 4 if quick else 7, 2)

    eval_block = copy.deepcopy(block).eval()
    infer = {"eager": infer_step(eval_block, x)}
    for name in (("compile (default)", "freezing") if quick else INFER_CONFIGS):
        try:
            with torch.no_grad():  # freezing happens when the graph is compiled under no_grad
                infer[name], compile_seconds[f"inference {name}"] = compiled_step(eval_block, INFER_CONFIGS[name],
                                                                                  infer_step, x)
        except Exception as error:
            compile_seconds[f"inference {name}"] = f"failed: {type(error).__name__}"
    infer_ms, infer_speedup = medians(infer, 2 * repeats)

    mask = mask_store(quick, (batch * seq, 4 * d))
    eager = categories["eager"]
    fixed = eager["matmul"] + eager["attention"]
    return {
        "shape": {"batch": batch, "seq": seq, "d_model": d, "n_heads": 8, "d_ff": 4 * d},
        "threads": {"torch": torch.get_num_threads(),
                    "inductor_cpp": torch._inductor.utils.parallel_num_threads()},
        "simd": {"isa": str(torch._inductor.cpu_vec_isa.pick_vec_isa()),
                 "simdlen_config": inductor_config.cpp.simdlen,
                 "bits": torch._inductor.cpu_vec_isa.pick_vec_isa().bit_width()},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train_ms": {k: v * 1e3 for k, v in train_ms.items()},
        "train_speedup": train_speedup,
        "compile_seconds": compile_seconds,
        "profile_ms_per_step": categories,
        "profile_top_events": top,
        "ceiling": sum(eager.values()) / fixed,
        "infer_ms": {k: v * 1e3 for k, v in infer_ms.items()},
        "infer_speedup": infer_speedup,
        "mask_store_ms": mask,
    }


def report(result: dict) -> tuple[list[str], list[str]]:
    shape, cats = result["shape"], result["profile_ms_per_step"]
    lines = [f"Pre-LN EncoderBlock (LayerNorm, sdpa), d {shape['d_model']}, {shape['n_heads']} heads, ff "
             f"{shape['d_ff']}, batch {shape['batch']} x {shape['seq']}, fp32, training step (forward + backward); "
             f"{result['threads']['torch']} torch threads, inductor C++ kernels on "
             f"{result['threads']['inductor_cpp']} threads, ISA {result['simd']['isa']} "
             f"({result['simd']['bits']}-bit vectors; cpp.simdlen={result['simd']['simdlen_config']} = auto). "
             "Round-robin medians; speed-up = median per-round eager / candidate; compile s = the first step (inductor's "
             "on-disk caches as found, so warm for a graph compiled before):", "",
             "| training step | ms | speed-up vs eager | compile s |", "|---|---|---|---|"]
    for name, ms in result["train_ms"].items():
        cs = result["compile_seconds"].get(name, "-")
        lines.append(f"| {name} | {ms:.1f} | {result['train_speedup'][name]:.2f} | "
                     f"{cs if isinstance(cs, str) else f'{cs:.1f}'} |")
    for name, cs in result["compile_seconds"].items():
        if isinstance(cs, str) and not name.startswith("inference"):
            lines.append(f"| {name} | - | - | {cs} |")
    eager, comp = cats["eager"], cats["compiled"]
    total_e, total_c = sum(eager.values()), sum(comp.values())
    lines += ["", "Profile of one training step (torch.profiler self CPU time, ms per step, per category the least "
              "over interleaved windows, as load from other processes only adds time; generated kernels profiled "
              "one by one):", "",
              "| category | eager ms | eager share | compiled ms | compiled share | compiled - eager ms |",
              "|---|---|---|---|---|---|"]
    for c in CATEGORIES:
        lines.append(f"| {c} | {eager[c]:.1f} | {eager[c] / total_e:.0%} | {comp[c]:.1f} | {comp[c] / total_c:.0%} | "
                     f"{comp[c] - eager[c]:+.1f} |")
    lines.append(f"| total | {total_e:.1f} | 100% | {total_c:.1f} | 100% | {total_c - total_e:+.1f} |")
    lines += ["", f"Matmul and attention run the same kernels in both (ATen mm/addmm on MKL, SDPA's CPU flash "
              f"kernel, which inductor does not decompose) and are {(eager['matmul'] + eager['attention']) / total_e:.0%} "
              f"of the eager step: even if compile made everything else free, the step could be at most "
              f"{result['ceiling']:.2f}x faster. The largest compiled events:", ""]
    lines += [f"- {key} ({cat}): {ms} ms" for key, ms, cat in result["profile_top_events"]["compiled"][:8]]
    mask = result["mask_store_ms"]
    lines += ["", "Most of compile's extra elementwise time is one kernel: for relu's backward the default partitioner "
              "saves the mask `relu_out <= 0` as a bool tensor, and inductor's AVX2 store of a float compare into "
              "bool (`VecMask<float,1>::store`) is far slower than ATen's. The mask alone at the FFN's hidden shape "
              f"({shape['batch'] * shape['seq']} x {shape['d_ff']}), ms: "
              + ", ".join(f"{k} {v:.1f}" for k, v in mask.items())
              + ". `torch._functorch.config.recompute_views = True` (or `aggressive_recomputation`) makes the "
              "partitioner save the relu output only and recompute the mask inside the backward kernel; see those "
              "rows above."]
    lines += ["", "Inference (eval, no_grad, same block and batch):", "",
              "| inference forward | ms | speed-up vs eager | compile s |", "|---|---|---|---|"]
    for name, ms in result["infer_ms"].items():
        cs = result["compile_seconds"].get(f"inference {name}", "-")
        lines.append(f"| {name} | {ms:.2f} | {result['infer_speedup'][name]:.2f} | "
                     f"{cs if isinstance(cs, str) else f'{cs:.1f}'} |")
    lines.append("")
    compiled_names = [n for n in result["train_speedup"] if n != "eager"]
    best = max(compiled_names, key=lambda n: result["train_speedup"][n])
    speedup = result["train_speedup"][best]
    infer_best = max((n for n in result["infer_speedup"] if n != "eager"), key=lambda n: result["infer_speedup"][n])
    mask = result["mask_store_ms"]
    verdicts = [
        f"{'met' if speedup >= 1.1 else 'NOT met'}: compiled Pre-LN block training step {speedup:.2f}x eager at best "
        f"({best}; target >= 1.1x); matmul + attention are {(eager['matmul'] + eager['attention']) / total_e:.0%} of "
        f"the eager step and unchanged by compile, so the ceiling here is {result['ceiling']:.2f}x; inductor's bool "
        f"mask store {mask['compiled x <= 0 (bool)'] / mask['eager x <= 0 (bool)']:.1f}x ATen's",
        f"measured: compiled inference forward {result['infer_speedup'][infer_best]:.2f}x eager at best ({infer_best})",
    ]
    return lines, verdicts


def section(quick: bool) -> tuple[list[str], list[str]]:
    return report(measure(quick))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = timing.add_options(parser).parse_args()
    timing.apply_options(args)
    result = measure(args.quick)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    lines, verdicts = report(result)
    print("\n".join(lines + [f"- {v}" for v in verdicts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
