"""Shared benchmark harness: timing, device description, CSV rows, markdown tables.

Every benchmark appends rows with the same columns to a CSV under ``benchmarks/results/``
(or ``$OUT`` when set) so results from CPU and GPU runs sit side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

COLUMNS = [
    "timestamp",
    "commit",
    "device",
    "benchmark",
    "model",
    "dtype",
    "n",
    "shape",
    "variant",
    "metric",
    "value",
    "unit",
]

REPO = Path(__file__).resolve().parent.parent

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Datasheet dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity).
BF16_PEAKS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def bf16_peak(device: str) -> float | None:
    """The datasheet dense 16-bit peak of the device named ``device``; None when unknown."""
    for key, peak in BF16_PEAKS.items():  # "H100 PCIe" is tried before "H100"
        if key in device:
            return peak
    return None


def results_dir() -> Path:
    out = os.environ.get("OUT")
    d = Path(out) if out else REPO / "benchmarks" / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d


def git_commit() -> str:
    try:
        return (
            subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, stderr=subprocess.DEVNULL
            )
            .decode()
            .strip()
        )
    except Exception:
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, rep: int = 5
) -> dict[str, float]:
    """Median / p20 / p80 wall time of ``fn`` in milliseconds.

    On CUDA this is ``triton.testing.do_bench`` when Triton is importable; elsewhere a
    plain loop with ``perf_counter`` and a device sync around each call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            p20, med, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
            return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


SDPA_CHOICES = ("default", "no-cudnn")


def sdpa_context(choice: str):
    """The attention backends a benchmark runs under: ``default`` (torch's choice; cuDNN
    attention on an H200 with torch 2.11) or ``no-cudnn`` (flash, memory-efficient or math).
    cuDNN attention builds an execution graph for every new shape, which other projects
    measured at hundreds of milliseconds; the statistics and target phases see many shapes.
    Run the two choices in separate processes: the graphs are cached per process."""
    if choice == "default":
        return contextlib.nullcontext()
    if choice != "no-cudnn":
        raise ValueError(f"sdpa: one of {SDPA_CHOICES}, got {choice!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def make_row(**kw) -> dict[str, object]:
    row = {c: "" for c in COLUMNS}
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    row["commit"] = git_commit()
    for k, v in kw.items():
        if k not in row:
            raise KeyError(f"unknown column {k!r}")
        row[k] = v
    return row


def timing_rows(variant: str, tm: dict[str, float], **common) -> list[dict[str, object]]:
    """The ``ms``, ``p20_ms`` and ``p80_ms`` rows of one ``time_fn`` result."""
    return [
        make_row(
            variant=variant,
            metric=metric.replace("median_", ""),
            value=tm[metric],
            unit="ms",
            **common,
        )
        for metric in ("median_ms", "p20_ms", "p80_ms")
    ]


def add_output_args(ap: argparse.ArgumentParser, csv_name: str, kernels: str) -> None:
    """The kernel benchmarks' last options: ``--interpret``, ``--csv``, ``--no-save``."""
    ap.add_argument(
        "--interpret",
        action="store_true",
        help=f"on CPU, also run the {kernels} (needs TRITON_INTERPRET=1; a smoke test, not a timing)",
    )
    ap.add_argument("--csv", default=csv_name, help="results file name (no .csv)")
    ap.add_argument("--no-save", action="store_true", help="print only, append no rows")


def parse_kernel_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; ``--interpret`` needs ``TRITON_INTERPRET=1`` and runs fp16 for bf16 on CPU
    (the interpreter has no bf16)."""
    args = ap.parse_args(argv)
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--interpret needs TRITON_INTERPRET=1 in the environment")
    if torch.device(args.device).type == "cpu" and args.dtype == "bfloat16" and args.interpret:
        args.dtype = "float16"  # the interpreter has no bf16
    return args


def report(args: argparse.Namespace, rows: list[dict[str, object]]) -> int:
    """Append ``rows`` to ``args.csv`` unless ``--no-save``, then print them as a table."""
    if not args.no_save:
        path = append_rows(args.csv, rows)
        sys.stdout.write(f"appended {len(rows)} rows to {path}\n")
    sys.stdout.write(
        markdown_table(rows, ["device", "dtype", "shape", "variant", "metric", "value", "unit"])
        + "\n"
    )
    return 0


def append_rows(name: str, rows: list[dict[str, object]]) -> Path:
    """Append ``rows`` to ``<results>/<name>.csv`` (header written once)."""
    path = results_dir() / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
