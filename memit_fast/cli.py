"""The ``memit-fast`` command.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that registers its
parser and sets ``func`` to a ``run_<name>(args) -> int``; :data:`SUBCOMMANDS` lists them.
Shared options (model loading) come from :func:`add_model_args` / :func:`load_model`.

Exit codes: 0 success, 2 bad input (arguments, files, malformed data), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("memit_fast.cli")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A user error: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# Shared: loading a model
# ---------------------------------------------------------------------------------------

DTYPES = ("float32", "float16", "bfloat16")


def emit(text: str) -> None:
    """Write one piece of a command's output to standard output."""
    print(text, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="local model directory (Hugging Face layout or GGUF)"
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model (dequantized on load)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="default: float32")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)"
    )


def check_model_args(args: argparse.Namespace) -> None:
    """The cheap checks of ``--model``, ``--gguf-file`` and ``--device`` (no loading):
    :class:`BadInput` for a directory that holds no model or a device that is not there."""
    import torch

    if not os.path.isdir(args.model):
        raise BadInput(f"--model {args.model!r} is not a directory")
    if args.gguf_file:
        if not os.path.isfile(os.path.join(args.model, args.gguf_file)):
            raise BadInput(f"--gguf-file {args.gguf_file!r} is not in {args.model!r}")
    elif not os.path.isfile(os.path.join(args.model, "config.json")):
        ggufs = sorted(f for f in os.listdir(args.model) if f.endswith(".gguf"))
        hint = f" (for a GGUF file pass --gguf-file {ggufs[0]})" if ggufs else ""
        raise BadInput(f"--model {args.model!r} holds no model: no config.json{hint}")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise BadInput(
                f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)"
            ) from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BadInput(f"--device {args.device!r}: CUDA is not available here")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise BadInput(
                    f"--device {args.device!r}: there are {torch.cuda.device_count()} CUDA devices"
                )


def model_n_layers(args: argparse.Namespace) -> int | None:
    """The number of blocks of the ``--model`` from its configuration alone (no weights),
    or ``None`` if the configuration does not say."""
    from transformers import AutoConfig

    from memit_fast.arch import text_config

    kw: dict[str, Any] = (
        {"gguf_file": args.gguf_file} if args.gguf_file else {"local_files_only": True}
    )
    text = text_config(AutoConfig.from_pretrained(args.model, **kw))
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(text, name, None)
        if isinstance(v, int):
            return v
    return None


def check_layers(layers, n_layers: int | None, what: str) -> None:
    """:class:`BadInput` unless every layer is a block of a model with ``n_layers``."""
    bad = [l for l in layers if l < 0 or (n_layers is not None and l >= n_layers)]
    if bad:
        have = f"; the model has blocks 0..{n_layers - 1}" if n_layers is not None else ""
        raise BadInput(f"{what}: layers {bad} out of range{have}")


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` (and ``--gguf-file``), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_args(args)
    kw: dict[str, Any] = {}
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    else:
        kw["local_files_only"] = True
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    # A directory that does not load (a broken config, no weights, no tokenizer) is bad
    # input, named as such; an error after loading is the command's own failure.
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
        if args.gguf_file:  # GGUF weights are dequantized to fp32, then cast
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kw)
            model = model.to(dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--model {args.model!r} does not load: {first}") from None
    if len(tokenizer) == 0:
        raise BadInput(f"--model {args.model!r} has no tokenizer files (an empty vocabulary)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(torch.device(device))
    model.eval()
    log.info("loaded %s in %.1f s on %s", args.model, time.perf_counter() - t0, device)
    return model, tokenizer


def load_data(path: str, n: int | None, fmt: str, skip_invalid: bool = False, flag: str = "--data"):
    """Requests from a data file (given as option ``flag``); ``fmt`` ``auto`` detects,
    ``zsre-alt`` is EasyEdit's zsRE; ``skip_invalid`` leaves malformed records out (logged)
    instead of failing."""
    from memit_fast.data import load_requests, load_zsre

    if not os.path.isfile(path):
        raise BadInput(f"{flag} {path!r} is not a file")
    if n is not None and n < 1:
        raise BadInput(f"-n must be at least 1, got {n}")
    errors = "skip" if skip_invalid else "raise"
    if fmt == "zsre-alt":
        return load_zsre(path, n=n, target="alt", errors=errors)
    return load_requests(path, n=n, format=None if fmt == "auto" else fmt, errors=errors)


def check_out_file(path: str, flag: str = "--out") -> None:
    """:class:`BadInput` unless a file can be written at ``path`` (its directory exists)."""
    if os.path.isdir(path):
        raise BadInput(f"{flag} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BadInput(f"{flag} {path!r}: the directory {parent!r} does not exist")


# ---------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------

FORMATS = ("auto", "counterfact", "counterfact_reduced", "zsre", "zsre-alt", "requests")


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="metrics of a model on an edit data set (CounterFact, zsRE, plain requests)",
        description="Evaluate a model on edit requests: CounterFact success/magnitude/score "
        "or zsRE token accuracy, with EasyEdit-style accuracies. Prints a table, or JSON "
        "with --json.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSON or JSONL data file")
    p.add_argument("-n", type=int, default=None, help="use the first N records")
    p.add_argument("--format", choices=FORMATS, default="auto", help="data format (default: auto)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="leave malformed records out (with a warning)"
    )
    p.add_argument(
        "--metrics",
        choices=("auto", "counterfact", "zsre"),
        default="auto",
        help="metric set (default: zsre for zsRE data, else counterfact)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="sequences per forward pass (default: 32)"
    )
    p.add_argument(
        "--generation",
        action="store_true",
        help="also generate from generation_prompts and report n-gram entropy (CounterFact "
        "metrics only)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=100,
        help="generation length in tokens, prompt included (default: 100)",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample top-k (default: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="write the full result (with per-record figures) as JSON")
    p.set_defaults(func=run_eval)


def _scored_pairs(r, kind: str) -> list[tuple[str, str, list[str]]]:
    """``(field, prompt, continuations)`` for each prompt of request ``r`` that the
    ``kind`` metrics (``counterfact`` or ``zsre``) score."""
    from memit_fast.evaluate import _neighborhood_pairs, with_leading_space

    cf = kind == "counterfact"
    tgts = [r.target] + ([r.target_true] if cf and r.target_true is not None else [])
    out = [("'prompt'", r.text, tgts)]
    out += [(f"'paraphrase_prompts' item {j}", p, tgts) for j, p in enumerate(r.paraphrase_prompts)]
    for p, ans, (field, _) in _neighborhood_pairs(r):
        if ans is not None:
            out.append((field, p, [r.target, ans] if cf else [ans]))
    return [(f, p, [with_leading_space(c) for c in cs]) for f, p, cs in out]


def check_sequences(
    requests, tokenizer, kind: str, n_ctx: int | None, name: str, skipped: bool = False
) -> None:
    """:class:`BadInput` naming the record and field of the first prompt + target scored
    by the ``kind`` metrics that is longer than the model's context ``n_ctx``. ``skipped``:
    invalid records were left out, so positions are not the file's record indices."""
    from memit_fast.evaluate import encode_continuation

    for i, r in enumerate(requests):
        for field, prompt, conts in _scored_pairs(r, kind):
            for c in conts:
                # Tokens never outnumber UTF-8 bytes by more than a few specials: only
                # texts near the limit are tokenized here (the metrics tokenize them all).
                if n_ctx is not None and len((prompt + c).encode()) + 8 <= n_ctx:
                    continue
                pos = f"request {i} of the valid ones" if skipped else f"record {i}"
                where = f"{name} {pos} (case_id {r.case_id}): field {field}"
                try:
                    p_ids, c_ids = encode_continuation(tokenizer, prompt, c)
                except ValueError as e:
                    raise BadInput(f"{where}: {e}") from None
                if n_ctx is not None and len(p_ids) + len(c_ids) > n_ctx:
                    t = c.strip()
                    t = t if len(t) <= 40 else t[:37] + "..."
                    raise BadInput(
                        f"{where} with its target {t!r} is {len(p_ids) + len(c_ids)} tokens, "
                        f"longer than the model's context of {n_ctx} tokens"
                    )


def run_eval(args: argparse.Namespace) -> int:
    from memit_fast.arch import context_length
    from memit_fast.evaluate import counterfact_metrics, format_metrics, zsre_metrics

    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.top_k is not None and args.top_k < 1:
        raise BadInput(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_length < 1:
        raise BadInput(f"--max-length must be at least 1, got {args.max_length}")
    if args.out:
        check_out_file(args.out)
    check_model_args(args)
    requests = load_data(args.data, args.n, args.format, args.skip_invalid)
    kind = args.metrics
    if kind == "auto":
        zs = all(r.extra.get("format") == "zsre" for r in requests)
        kind = "zsre" if zs else "counterfact"
    model, tokenizer = load_model(args)
    n_ctx = context_length(model)
    name = os.path.basename(args.data)
    check_sequences(requests, tokenizer, kind, n_ctx, name, skipped=args.skip_invalid)
    generation = args.generation and kind == "counterfact"
    if generation and n_ctx is not None and args.max_length > n_ctx:
        raise BadInput(
            f"--max-length {args.max_length} is longer than the model's context of {n_ctx}"
        )
    if generation and args.top_k is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if args.top_k > vocab:
            raise BadInput(f"--top-k {args.top_k} is more than the {vocab} tokens of the model")
    t0 = time.perf_counter()
    if kind == "zsre":
        res = zsre_metrics(model, tokenizer, requests, batch_size=args.batch_size)
    else:
        res = counterfact_metrics(
            model,
            tokenizer,
            requests,
            batch_size=args.batch_size,
            generation=args.generation,
            generation_max_length=args.max_length,
            generation_top_k=args.top_k,
            generation_seed=args.seed,
        )
    seconds = time.perf_counter() - t0
    records = res.pop("records")
    summary = {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "data": args.data,
        "n": len(requests),
        "metric_set": kind,
        "dtype": args.dtype,
        "seconds": round(seconds, 3),
        "metrics": res,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({**summary, "records": records}, f, indent=1)
            f.write("\n")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        title = f"{kind} metrics: {args.model} on {args.data} ({seconds:.1f} s)"
        print(format_metrics(res, title=title))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [add_eval_parser]


def build_parser() -> argparse.ArgumentParser:
    from memit_fast.cli_commands import (
        add_bench_parser,
        add_demo_parser,
        add_edit_parser,
        add_stats_parser,
    )

    parser = argparse.ArgumentParser(
        prog="memit-fast", description="Mass-editing memory in transformer language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in [
        *SUBCOMMANDS,
        add_edit_parser,
        add_stats_parser,
        add_demo_parser,
        add_bench_parser,
    ]:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from memit_fast.data import EditRequestError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (BadInput, EditRequestError) as e:
        # one problem in one line; several listed one a line under a heading
        one = isinstance(e, EditRequestError) and len(e.problems) == 1
        print(f"memit-fast {args.command}: {e.problems[0] if one else e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as e:  # the CLI reports every failure in one line (-v: traceback)
        if args.verbose:
            log.exception("failure")
        print(f"memit-fast {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
