"""Key statistics: the engine's one corpus pass for all edited layers against one pass per
layer, the structure of the published code, on the same texts.

    python benchmarks/bench_stats.py --model smollm2 --samples 300 --max-length 128

Three ways to get ``C_l`` for every edited layer ``l``:

- ``one_pass``: ``memit_fast.stats.collect_stats`` once for all layers; the forward stops
  inside the deepest edited block.
- ``per_layer_stop``: one pass per layer, each ending inside its own layer (the published
  ``layer_stats`` with ``Trace(..., stop=True)``).
- ``per_layer_full``: one pass per layer of the whole model, head included (the issue's
  "five per-layer passes of the whole model").

All three read the same tokenized texts in the same batches and agree to float rounding
(checked, printed). Rows go to ``<results>/stats.csv``; a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_edit import (  # noqa: E402
    DTYPES,
    MODELS,
    RANDOM_ARCHS,
    PeakMemory,
    Skip,
    load_smollm2,
    load_world_model,
    random_model,
)
from benchmarks.harness import (  # noqa: E402
    SDPA_CHOICES,
    append_rows,
    device_name,
    make_row,
    markdown_table,
    sdpa_context,
    synchronize,
)
from benchmarks.published_mode import _grouped_order, _tokenize_corpus, layer_pass  # noqa: E402
from memit_fast.arch import ModelAdapter  # noqa: E402
from memit_fast.config import auto_config  # noqa: E402
from memit_fast.keys import pad_id  # noqa: E402
from memit_fast.stats import collect_stats, default_corpus_path  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# The passes timed: all layers in one pass; one pass per layer stopping after it; one pass
# per layer through the whole model (the published structure).
VARIANTS = ("one_pass", "per_layer_stop", "per_layer_full")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=MODELS)
    ap.add_argument("--model-dir", default="/tmp/smol/model")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", default=None, help="comma-separated (default: the config's)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default="stats")
    ap.add_argument("--md", default=None)
    ap.add_argument(
        "--sdpa", default="default", choices=SDPA_CHOICES,
        help="attention backends (no-cudnn: without cuDNN attention, which builds a graph per shape)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    random_arch = args.model in RANDOM_ARCHS
    dtype_name = args.dtype or ("bfloat16" if random_arch and device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    try:
        if args.model == "smollm2":
            model, tok = load_smollm2(args.model_dir, dtype, device)
        elif args.model == "world":
            model, tok, _ = load_world_model(dtype, device)
        else:
            model, tok = random_model(args.model, dtype, device, args.tiny)
    except Skip as e:
        print(f"SKIP {args.model}: {e}")
        return 0
    ad = ModelAdapter(model)
    layers = (
        tuple(int(x) for x in args.layers.split(",")) if args.layers else auto_config(model).layers
    )
    corpus = args.corpus or str(default_corpus_path())
    texts = _tokenize_corpus(tok, corpus, args.samples, args.max_length)
    ordered = _grouped_order(texts, args.batch_size)
    n_tokens = sum(len(t) for t in texts)
    pad = pad_id(tok)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        ap.error(f"--variants: unknown {unknown}; take some of {', '.join(VARIANTS)}")
    model_label = args.model + ("-tiny" if args.tiny else "") + ("-random" if random_arch else "")
    dev_label = device_name(device)
    shape = f"layers={','.join(map(str, layers))};texts={len(texts)};tokens={n_tokens}"
    if args.sdpa != "default":
        shape += f";sdpa={args.sdpa}"
    print(f"# statistics: {model_label} on {dev_label}, {dtype_name}, {shape}", flush=True)

    def run(variant):
        if variant == "one_pass":
            return collect_stats(
                model,
                _PreTokenized(tok, texts),
                ad,
                layers,
                range(len(texts)),
                samples=len(texts),
                max_length=args.max_length,
                batch_size=args.batch_size,
            )
        stop = variant == "per_layer_stop"
        return {
            l: layer_pass(model, ad, l, ordered, pad=pad, batch_size=args.batch_size, stop=stop)
            for l in layers
        }

    common = dict(
        benchmark="stats",
        model=model_label,
        dtype=dtype_name,
        device=dev_label,
        n=len(layers),
        shape=shape,
    )

    def variant_rows(v):
        rows = [
            make_row(variant=v, metric="seconds", value=round(times[v], 4), unit="s", **common),
            make_row(variant=v, metric="cpu_seconds", value=round(cpus[v], 4), unit="s", **common),
            make_row(
                variant=v,
                metric="tokens_per_s",
                value=round(n_tokens / times[v], 1),
                unit="tokens/s",
                **common,
            ),
            make_row(
                variant=v,
                metric="peak_memory",
                value=peaks[v],
                unit=f"bytes ({mem.kind})",
                **common,
            ),
        ]
        if "one_pass" in times and v != "one_pass":
            ratio, cpu_ratio = times[v] / times["one_pass"], cpus[v] / cpus["one_pass"]
            rows.append(make_row(variant=v, metric="ratio_vs_one_pass", value=round(ratio, 3), unit="x", **common))  # fmt: skip
            rows.append(make_row(variant=v, metric="cpu_ratio_vs_one_pass", value=round(cpu_ratio, 3), unit="x", **common))  # fmt: skip
        return rows

    with sdpa_context(args.sdpa):  # the attention backends of every timed pass
        # Warm-up: one small batch through the whole model.
        with torch.no_grad():
            model(input_ids=torch.tensor([texts[0][:16]], device=device), use_cache=False)
        times, cpus, peaks, out = {}, {}, {}, {}
        mem = PeakMemory(device)
        for v in variants:
            print(f"## {v} ...", flush=True)
            mem.reset()
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out[v] = run(v)
            synchronize(device)
            times[v] = time.perf_counter() - t0
            cpus[v] = time.process_time() - c0
            peaks[v] = mem.peak()
            print(f"   {times[v]:.2f} s ({cpus[v]:.2f} s CPU)", flush=True)
            # Each variant's rows reach the CSV as it finishes (a later one may time out).
            append_rows(args.csv, variant_rows(v))
    base = variants[0]
    agree = {v: max(rel(out[v][l].mom2, out[base][l].mom2) for l in layers) for v in variants[1:]}
    for v, e in agree.items():
        print(f"max relative difference {v} vs {base}: {e:.2e}")
        if e > 1e-4:
            print(f"WARNING: {v} disagrees with {base}")

    table = []
    for v in variants:
        ratio = times[v] / times["one_pass"] if "one_pass" in times else None
        cpu_ratio = cpus[v] / cpus["one_pass"] if "one_pass" in cpus else None
        table.append(
            {
                "variant": v,
                "passes": 1 if v == "one_pass" else len(layers),
                "seconds": f"{times[v]:.2f}",
                "tokens/s": f"{n_tokens / times[v]:.0f}",
                "CPU s": f"{cpus[v]:.2f}",
                "x slower than one pass": f"{ratio:.2f}x" if ratio is not None else "",
                "x (CPU time)": f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "",
                "max rel. diff": f"{agree[v]:.1e}" if v in agree else "",
            }
        )
    md = f"### statistics — {model_label}, {dev_label}, {dtype_name}\n\n{shape}\n\n"
    md += markdown_table(
        table,
        [
            "variant",
            "passes",
            "seconds",
            "CPU s",
            "tokens/s",
            "x slower than one pass",
            "x (CPU time)",
            "max rel. diff",
        ],
    )
    print(md, flush=True)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n\n")
    return 0


class _PreTokenized:
    """Feeds already-tokenized texts to ``collect_stats`` (which tokenizes its texts):
    text ``i`` of the iterable is the index ``i``, and calling this returns its ids."""

    def __init__(self, tok, texts):
        self.tok = tok
        self.texts = texts
        for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
            setattr(self, name, getattr(tok, name, None))

    def __call__(self, i, **kw):
        return {"input_ids": self.texts[i]}


if __name__ == "__main__":
    sys.exit(main())
