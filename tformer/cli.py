"""The ``tformer`` command line (also ``python -m tformer``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    import torch

    import tformer
    from tformer import kernels
    from tformer.backends import resolve_backend

    kernel_status = kernels.build() if args.build_kernels else kernels.status()
    probe = torch.zeros(1, 1, 1, 8, device=args.device)
    print(f"tformer {tformer.__version__}, torch {torch.__version__}")
    print(f"norms:       {', '.join(tformer.NORMS)} (and 'deepnorm' = layernorm + deepnorm placement)")
    print(f"placements:  {', '.join(tformer.PLACEMENTS)}")
    print(f"activations: {', '.join(tformer.ACTIVATIONS)}")
    print(f"attention:   {', '.join(tformer.BACKENDS)}; 'auto' runs {resolve_backend('auto', probe)!r} on {args.device}")
    print(f"C kernels:   {kernel_status} (RMSNorm on CPU; {kernels.ENV_SWITCH}=0 switches them off)")
    if args.build_kernels and not kernel_status.available and not kernels._switched_off(kernels.ENV_SWITCH):
        return 1  # asked to build and could not: a launch script should stop here
    return 0


def _grid(args: argparse.Namespace) -> int:
    from tformer.grid import grid_markdown, run_grid

    qk_norm = False if args.qk_norm == "off" else args.qk_norm
    rows = run_grid(d_model=args.d_model, n_layers=args.layers, attention=args.attention, n_kv_heads=args.kv_heads,
                    qk_norm=qk_norm, rope=args.rope)
    print(f"Residual-stream RMS after a {args.layers}-layer encoder at initialization "
          f"(d_model={args.d_model}, attention={args.attention!r}); every cell also ran a decoder "
          f"with cross-attention forward and backward:\n")
    print(grid_markdown(rows))
    failed = [r for r in rows if not (r.finite and r.all_params_get_grad)]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} combinations ran with finite outputs and "
          f"gradients for every parameter ({sum(r.seconds for r in rows):.1f} s).")
    return 1 if failed else 0


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]`` -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _recipe_config(task_hint: str | None, items: list[str]) -> dict:
    import yaml

    from tformer.errors import ConfigError
    from tformer.recipe_config import load_config, parse_override
    from tformer.training.schema import recipe_defaults

    path, overrides = _split_config_args(items)
    task = task_hint
    if path is not None and Path(path).is_file():
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError:
            loaded = {}
        if isinstance(loaded, dict) and "task" in loaded:
            task = loaded["task"]
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["task"]:
            task = value
    if task_hint is not None and task != task_hint:
        raise ConfigError(f"this recipe trains task={task_hint!r}, the config asks for task={task!r}")
    return load_config(recipe_defaults(task or "lm"), path, overrides)


def _train(args: argparse.Namespace) -> int:
    from tformer.training.diagnosis import TrainingDiverged
    from tformer.training.loop import TrainingInterrupted, train

    config = _recipe_config(args.task, args.config)
    if args.print_config:  # checked as the run checks it (data, model on the meta device, ...), then printed
        from tformer.recipe_config import dump_config
        from tformer.training.schema import check_recipe

        check_recipe(config)
        print(dump_config(config), end="")
        return 0
    try:
        result = train(config)
    except TrainingDiverged as error:
        print(f"tformer train: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM during the steps: the step's checkpoint is written
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ntformer train: {stop}", file=sys.stderr)
        return stop.exit_code  # 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:  # Ctrl-C outside the steps (setting up): say what a rerun does, from latest.json
        run_dir = Path(config["out_dir"]) / config["run"]
        try:
            newest = json.loads((run_dir / "latest.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            newest = None
        if not config["resume"]:
            then = "the same command starts over (resume=false)"
        elif newest is None:
            then = f"{run_dir} holds no checkpoint yet: the same command starts over"
        else:
            then = f"run the same command to resume from step {newest}, the newest checkpoint in {run_dir}"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ntformer train: interrupted; {then}", file=sys.stderr)
        return 130
    final = result.final
    if int(os.environ.get("RANK", "0")) == 0:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "step")
        print(f"{config['run']}: {result.steps} steps; {summary}")
        print(f"model: {result.run_dir / 'model.safetensors'}   metrics: {result.run_dir / 'metrics.jsonl'}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from tformer.study import run_study

    rows, _ = run_study(args.out, placements=args.placements, norms=args.norms, warmup_steps=args.warmup,
                        steps=args.steps, target_loss=args.target_loss, overrides=args.overrides)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.md, results.csv, loss_curves.png")
    return 0


def _atlas(args: argparse.Namespace) -> int:
    import torch

    from tformer.atlas import AtlasInterrupted, make_grid, run_atlas
    from tformer.errors import ConfigError

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    cell = {"steps": args.steps} if args.steps is not None else {}
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu":
        cell["device"] = device
    grid = make_grid("quick" if args.quick else "default", norms=args.norms, placements=args.placements,
                     depths=args.depths, lrs=args.lrs, warmups=args.warmups, seeds=args.seeds, cell=cell)
    n_cells = len(grid.cells())
    print(f"tformer atlas: {n_cells} cells ({len(grid.norms)} norms x {len(grid.placements)} placements x "
          f"{len(grid.depths)} depths x {len(grid.lrs)} learning rates x {len(grid.warmups)} warmups x "
          f"{len(grid.seeds)} seeds) into {args.out}, {args.jobs} job(s)", file=sys.stderr)
    try:
        run_atlas(args.out, grid, jobs=args.jobs, progress=not args.no_progress)
    except AtlasInterrupted as stop:
        print(f"tformer atlas: {stop}", file=sys.stderr)
        return 130
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}/summary.md, cells.csv, cells.json, stable_lr.csv, heatmap_depth*.png")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from tformer.analysis.reproductions import REPRODUCTIONS, run_reproduction

    if args.name == "scales":
        return _analyze_scales(args)
    from tformer.atlas import AtlasInterrupted

    names = list(REPRODUCTIONS) if args.name == "all" else [args.name]
    for name in names:
        try:
            out = run_reproduction(name, args.out, quick=args.quick, jobs=args.jobs)
        except AtlasInterrupted as stop:
            print(f"tformer analyze {name}: {stop}", file=sys.stderr)
            return 130
        print((out / "summary.md").read_text())
        print(f"wrote {out}/\n")
    if args.report:
        from tformer.analysis.reproductions import write_report

        print(f"wrote {write_report(args.out, args.report)}")  # every summary under --out, not only this run's
    return 0


def _analyze_scales(args: argparse.Namespace) -> int:
    import tformer
    from tformer.analysis import expected_gradient_scales
    from tformer.analysis.reproductions import corpus_batches
    from tformer.training.tasks import lm_loss

    if not args.checkpoint:
        raise SystemExit("tformer analyze scales: give --checkpoint PATH (a LanguageModel checkpoint or run directory)")
    model = tformer.load(_resolve_checkpoint(args.checkpoint)).train()
    if not isinstance(model, tformer.LanguageModel):
        raise SystemExit(f"tformer analyze scales: {args.checkpoint} holds a {type(model).__name__}, not a LanguageModel")
    seq_len = min(128, model.embedding.max_seq_len)
    rows = expected_gradient_scales(model, corpus_batches(args.batches, seq_len=seq_len), lm_loss)
    print(f"{'stack':8s} {'layer':>5s} {'param':28s} {'grad_norm':>10s} {'param_norm':>10s} {'ratio':>9s}")
    for r in rows:
        print(f"{r['stack']:8s} {r['layer']:5d} {r['param']:28s} {r['grad_norm']:10.4g} {r['param_norm']:10.4g} "
              f"{r['ratio']:9.3g}")
    return 0


def _resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


def _tokenizer_beside(checkpoint: Path):
    """The tokenizer a run wrote beside its checkpoints (``tokenizer.json`` in the checkpoint's directory or,
    for a ``step_NNNNNNN/`` checkpoint, its run directory), else bytes."""
    from tformer.tokenization import TOKENIZER_FILE, tokenizer_for

    for directory in (checkpoint.parent, checkpoint.parent.parent):
        if (directory / TOKENIZER_FILE).is_file():
            return tokenizer_for(directory)
    return tokenizer_for(checkpoint.parent)


def _generate(args: argparse.Namespace) -> int:
    import torch

    import tformer

    path = _resolve_checkpoint(args.checkpoint)
    model = tformer.load(path)
    if not isinstance(model, tformer.LanguageModel):
        raise SystemExit(f"tformer generate: {args.checkpoint} holds a {type(model).__name__}, not a LanguageModel")
    tokenizer = _tokenizer_beside(path)
    if tokenizer.vocab_size != model.spec.vocab_size:
        raise SystemExit(f"tformer generate: the model has {model.spec.vocab_size} token ids but the tokenizer beside "
                         f"it ({tokenizer.name}) has {tokenizer.vocab_size}; is its tokenizer.json missing?")
    prompt = tokenizer.encode(args.prompt)[None, :]
    room = model.embedding.max_seq_len - prompt.shape[1]
    if room < 1:
        raise SystemExit(f"tformer generate: the prompt is {prompt.shape[1]} tokens; the model's limit is "
                         f"{model.embedding.max_seq_len}")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = model.generate(prompt, min(args.max_new_tokens, room), temperature=args.temperature,
                            top_k=args.top_k or None, generator=generator)
    print(tokenizer.decode(tokens[0]))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import tformer
    from tformer.checkpoint import readable_args
    from tformer.recipe_config import dump_config

    path = _resolve_checkpoint(args.checkpoint)
    meta = tformer.read_metadata(path)
    model = tformer.load(path)
    description = meta["model"]
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    print(f"file:            {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"model:           {description['class']}")
    print(f"parameters:      {n_params:,} (+{n_buffers:,} buffer values)")
    print(f"format version:  {meta['format_version']} (written by tformer {meta['tformer_version']})")
    if meta["aliases"]:
        print("tied weights:    " + ", ".join(f"{a} = {t}" for a, t in meta["aliases"].items()))
    if meta["user"]:
        print("metadata:        " + json.dumps(meta["user"]))
    tokenizer = _tokenizer_beside(path)
    print(f"tokenizer:       {tokenizer.name} ({tokenizer.vocab_size} ids)")
    print("spec (constructor arguments):")
    args_text = dump_config(readable_args(description))
    print("".join("  " + line + "\n" for line in args_text.splitlines()), end="")
    return 0


PREPARE_KEYS = ("data.path", "data.tokenizer", "data.vocab_size", "out")


def _prepare(args: argparse.Namespace) -> int:
    from tformer.errors import ConfigError
    from tformer.recipe_config import parse_override
    from tformer.tokenization import prepare
    from tformer.training.schema import LM_DEFAULTS

    data = LM_DEFAULTS["data"]  # the recipes' defaults for the tokenizer keys
    values = {"data.path": None, "data.tokenizer": data["tokenizer"], "data.vocab_size": data["vocab_size"],
              "out": None}
    for item in args.items:
        keys, value = parse_override(item)
        key = ".".join(keys)
        if key not in values:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(PREPARE_KEYS)}")
        values[key] = value
    if values["data.path"] is None:
        raise ConfigError("data.path=FILE_OR_FOLDER is required (a UTF-8 text file, or a folder of *.txt files)")
    out = values["out"] or f"{str(values['data.path']).rstrip('/')}.tokens"
    meta = prepare(str(values["data.path"]), str(out), values["data.tokenizer"], values["data.vocab_size"],
                   progress=not args.quiet)
    print(f"{out}: {meta['n_tokens']:,} tokens ({meta['tokenizer']}, {meta['vocab_size']} ids, {meta['dtype']}) from "
          f"{meta['bytes']:,} bytes in {len(meta['files'])} file(s); train with data.path={out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tformer",
        description="Transformer blocks where the placement of normalization is a first-class design axis.",
    )
    from tformer import __version__

    parser.add_argument("--version", action="version", version=f"tformer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="list the registered norms, placements and attention backends",
                               description="List the registered norms, placements, activations and attention "
                                           "backends, and which backend attention='auto' picks on a device.")
    info.add_argument("--device", default="cpu", help="device to resolve attention='auto' for (default: cpu)")
    info.add_argument("--build-kernels", action="store_true",
                      help="build the C RMSNorm kernel now (or load it from the cache) and print its status; "
                           "run it once before torchrun starts several ranks. Exit code 1 if it cannot be built")
    info.set_defaults(run=_info)

    grid = commands.add_parser("grid", help="run every norm x placement combination once and print the grid",
                               description="Build a small encoder and decoder for every registered norm x "
                                           "placement, run forward and backward on padded random data, and print "
                                           "the residual-stream RMS at initialization as a markdown table. "
                                           "Exits non-zero if any combination gives non-finite values or leaves "
                                           "a parameter without a gradient.")
    grid.add_argument("--d-model", type=int, default=64, help="model width (default: 64)")
    grid.add_argument("--layers", type=int, default=6, help="layers per stack (default: 6)")
    grid.add_argument("--attention", default="auto", help="attention backend (default: auto)")
    grid.add_argument("--kv-heads", type=int, default=None,
                      help="key/value heads for grouped-query attention (default: as many as the 4 query heads)")
    grid.add_argument("--qk-norm", default="off", choices=["off", "head", "full"], help="QK-norm (default: off)")
    grid.add_argument("--rope", action="store_true", help="rotary positions in self-attention")
    grid.set_defaults(run=_grid)

    train = commands.add_parser(
        "train", help="train a recipe (language model or seq2seq) from a YAML config",
        description="Train a language model on the embedded corpus (or your text file) or an encoder-decoder on "
                    "a synthetic task. CONFIG is a YAML file (see recipes/configs/); key=value arguments override "
                    "its keys, e.g. train.lr=3e-4 model.block.placement=post. A run resumes from "
                    "<out_dir>/<run>/ when a checkpoint is there (resume=false starts over). Works under torchrun.")
    train.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="config file and overrides")
    train.add_argument("--task", choices=["lm", "seq2seq"], default=None, help="the task when no config file names it")
    train.add_argument("--print-config", action="store_true", help="check the config as a run would (nothing trained or written), print it and exit; a bad config exits with code 2")
    train.set_defaults(run=_train)

    study = commands.add_parser(
        "study", help="train each placement with and without warmup and report which needs it",
        description="The placement study (Xiong et al. 2020, section 3.2): train the same 6-layer byte-level LM on "
                    "the embedded corpus under each placement x norm, with and without learning-rate warmup, and "
                    "write results.md, results.csv and loss_curves.png. The default takes about 7 minutes on 2 CPU "
                    "cores. key=value arguments (given before the options) override the recipe config of every run.")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="recipe config overrides for every run")
    study.add_argument("--out", default="runs/study", help="output directory (default: runs/study)")
    from tformer import NORMS, PLACEMENTS

    study.add_argument("--placements", nargs="+", default=["pre", "post", "sandwich", "deepnorm"],
                       help=f"placements to compare (default: pre post sandwich deepnorm; any of: {' '.join(PLACEMENTS)})")
    study.add_argument("--norms", nargs="+", default=["layernorm", "rmsnorm"],
                       help=f"norms to compare (default: layernorm rmsnorm; any of: {' '.join(NORMS)})")
    study.add_argument("--warmup", type=int, default=100, help="warmup steps of the warmup arm (default: 100)")
    study.add_argument("--steps", type=int, default=300, help="training steps per run (default: 300)")
    study.add_argument("--target-loss", type=float, default=2.6, help="loss for 'steps to target' (default: 2.6)")
    study.set_defaults(run=_study)

    from tformer.atlas import DEFAULT_GRID, QUICK_GRID

    def defaults(axis: str) -> str:
        def show(values) -> str:
            return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

        return f"(default: {show(DEFAULT_GRID[axis])}; --quick: {show(QUICK_GRID[axis])})"

    atlas = commands.add_parser(
        "atlas", help="map where each norm x placement trains: learning rate x depth x warmup, several seeds",
        description="The stability atlas: train a small byte-level LM on the embedded corpus for every cell of "
                    "norm x placement x depth x peak learning rate x warmup x seed, classify each (trains, stuck "
                    "at the unigram entropy, diverged) and write heatmaps per depth, the largest stable learning "
                    "rate per norm x placement x depth, CSV/JSON of every cell and summary.md. Finished cells are "
                    "cached in OUT/cells: Ctrl-C and run the same command to resume; a larger grid reuses a "
                    "smaller one's cells. On 2 CPU cores the default grid takes about 45 minutes, --quick about 3; "
                    "a machine with more cores runs more cells at once (--jobs, one thread each), and --device cuda "
                    "trains cells on a GPU (several jobs can share it), which makes longer cells and deeper grids "
                    "(--steps, --depths) affordable.")
    atlas.add_argument("--quick", action="store_true", help="a small corner of the default grid")
    atlas.add_argument("--out", default="runs/atlas", help="output directory (default: runs/atlas)")
    atlas.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                       help="cells run in this many processes, one thread each (default: the CPU cores this "
                            "process may use, here %(default)s)")
    atlas.add_argument("--norms", nargs="+", help=f"norms, or 'all' (default: every registered one; --quick: "
                                                  f"{' '.join(QUICK_GRID['norms'])}; any of: {' '.join(NORMS)})")
    atlas.add_argument("--placements", nargs="+", help="placements, or 'all' " + defaults("placements") + f"; any of: {' '.join(PLACEMENTS)}")
    atlas.add_argument("--depths", nargs="+", type=int, help="numbers of layers " + defaults("depths"))
    atlas.add_argument("--lrs", nargs="+", type=float, help="peak learning rates " + defaults("lrs"))
    atlas.add_argument("--warmups", nargs="+", type=int, help="warmup steps, 0 for none " + defaults("warmups"))
    atlas.add_argument("--seeds", nargs="+", type=int, help="seeds " + defaults("seeds"))
    atlas.add_argument("--steps", type=int, help="training steps per cell (default: 120)")
    atlas.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where cells train (default: auto, a GPU when torch sees one); cells are cached per device")
    atlas.add_argument("--no-progress", action="store_true", help="no progress bar")
    atlas.set_defaults(run=_atlas)

    from tformer.analysis.reproductions import REPRODUCTIONS

    analyze = commands.add_parser(
        "analyze", help="gradient-scale analysis: the papers' figures reproduced, or a checkpoint's gradients",
        description="Reproduce a paper's figure at CPU scale (CSV + PNG + summary.md beside the paper's claim), or "
                    "with 'scales --checkpoint PATH' print the per-layer gradient scales of a language-model "
                    "checkpoint on the embedded corpus. Reproductions: "
                    + "; ".join(f"{name}: {r.title}" for name, r in REPRODUCTIONS.items()) + ".")
    analyze.add_argument("name", choices=[*REPRODUCTIONS, "all", "scales"], help="what to run")
    analyze.add_argument("--out", default="runs/analysis", help="output directory (default: runs/analysis)")
    analyze.add_argument("--quick", action="store_true", help="smaller settings, for a smoke test")
    analyze.add_argument("--jobs", type=int, default=1,
                         help="processes for the reproductions made of atlas cells (deepnet-depth; default: 1)")
    analyze.add_argument("--checkpoint", help="for 'scales': a LanguageModel checkpoint or run directory")
    analyze.add_argument("--batches", type=int, default=8, help="for 'scales': batches to average (default: 8)")
    analyze.add_argument("--report", help="also combine every summary and figure under --out (this run's and "
                         "earlier ones, in the order above) into this markdown file")
    analyze.set_defaults(run=_analyze)

    generate = commands.add_parser(
        "generate", help="sample text from a language-model checkpoint",
        description="Load a LanguageModel checkpoint (a .safetensors file or a run directory) and sample a "
                    "continuation of the prompt with a KV cache.")
    generate.add_argument("checkpoint", help="model.safetensors file or run directory")
    generate.add_argument("--prompt", default="The ", help="text to continue (default: 'The ')")
    generate.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    generate.add_argument("--top-k", type=int, default=40, help="sample among the k most likely (0: all; default 40)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.set_defaults(run=_generate)

    prepare = commands.add_parser(
        "prepare", help="tokenize a text file or folder into a memory-mapped token file for training",
        description="Tokenize data.path (a UTF-8 text file, or the *.txt files of a folder, in sorted order) in one "
                    "streaming pass into OUT/tokens.bin (uint16, or uint32 for vocabularies over 65536) and "
                    "OUT/meta.json (plus OUT/tokenizer.json for BPE, trained on the input in a first pass). "
                    "Memory stays bounded whatever the input's size. Train from it with data.path=OUT.")
    prepare.add_argument("items", nargs="*", metavar="key=value",
                         help="data.path=FILE_OR_FOLDER (required), data.tokenizer=byte|bpe, data.vocab_size=N "
                              "(bpe; default 4096), out=DIR (default: data.path + '.tokens')")
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")
    prepare.set_defaults(run=_prepare)

    inspect = commands.add_parser(
        "inspect", help="print a checkpoint's model class, config, parameter count and metadata",
        description="Read a tformer checkpoint (never executing anything from it) and print what it holds.")
    inspect.add_argument("checkpoint", help="model.safetensors file or run directory")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tformer.errors import CheckpointError, ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError) as error:
        print(f"tformer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
