"""The issues' GPU targets, read off the benchmark CSVs: met, missed, or not measured.

    python benchmarks/targets.py                              # every GPU in benchmarks/results
    python benchmarks/targets.py --device H200 --since 2026-11-25T22:00:00+00:00
    python benchmarks/targets.py --results $OUT --since "$START"   # what gpu_suite.sh runs

For each target it takes, per device, the latest row of every (variant, metric) at its size
(rows at or after ``--since`` only), keeps the variants whose accuracy check holds, and
reports the best of them against the threshold. The fastest variant that failed its
accuracy check (or had no row to check it by) is named beside it, so a speed bought with
accuracy is visible but never counted. A target without rows at its size is "not
measured": nothing is extrapolated.

The targets (issue 4: Triton kernels; issue 5: the C++/CUDA extension):

- covariance ``C += X^T X`` at d 16,384, t 65,536 (bf16): at least 60 % of the dense bf16
  GEMM's measured rate (``frac_of_dense_gemm``), for the Triton kernel and for the cuBLAS row
  panels that ``covariance_accumulate`` sends 16-bit keys to;
- the fused solve/update at dk 16,384, dh 4,096, n 10,000: at least 1.5x the torch chain,
  with an error of the written update at most 1.1x the chain's (``validation_rel_err``);
- the layer solve at dk 16,384, n 10,000: at least 3x float64 ``torch.linalg.solve``, within
  1e-10 of the float64 solution or, where that solution's own error is larger, with a
  backward error at float64 level (``layer_solve``; the layer's whole update in the update
  order, ``layer_delta`` against ``published_delta``, beside it);
- the rank-n factor update at dk 16,384, n 100: at least 5x refactoring, equal to the
  refactored factor within 1e-6 (``rel_diff_refactor``).

Exit status 0 whatever the verdicts (``--strict``: 1 unless every target is met).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# variant -> metric -> (value, timestamp)
Rows = dict[str, dict[str, tuple[float, str]]]


@dataclass(frozen=True)
class Target:
    issue: int
    name: str
    csv: str  # file name in the results folder, without .csv
    shape: str
    n: str | None  # the CSV's n column, where the shape does not fix it
    metric: str  # higher is better
    threshold: float
    variants: Callable[[str], bool]
    # (variant, rows) -> None if accurate enough, else why not
    accurate: Callable[[str, Rows], str | None]


def _always(variant: str, rows: Rows) -> str | None:
    return None


def _at_most(metric: str, bound: float) -> Callable[[str, Rows], str | None]:
    def check(variant: str, rows: Rows) -> str | None:
        got = rows[variant].get(metric)
        if got is None:
            return f"no {metric} row"
        return None if got[0] <= bound else f"{metric} {got[0]:.3g} > {bound:.3g}"

    return check


def _float64_accurate(baseline: str) -> Callable[[str, Rows], str | None]:
    """Within 1e-10 of the published float64 solve, or, where that solve's own error is
    larger (a condition number near 1e7 makes two float64 solves differ by ~1e-10), a
    normwise backward error at float64 level: at most twice the published solve's, or the
    unit roundoff 2^-53."""

    def check(variant: str, rows: Rows) -> str | None:
        diff = rows[variant].get("rel_diff_fp64")
        if diff is None:
            return "no rel_diff_fp64 row"
        if diff[0] <= 1e-10:
            return None
        why = f"rel_diff_fp64 {diff[0]:.3g} > 1e-10"
        mine, ref = rows[variant].get("bwd_err"), rows.get(baseline, {}).get("bwd_err")
        if mine is None or ref is None:
            return why + " (no bwd_err rows)"
        bound = max(2.0 * ref[0], 2.0**-53)
        if mine[0] <= bound:
            return None
        return why + f", bwd_err {mine[0]:.3g} > {bound:.3g}"

    return check


def _update_error(variant: str, rows: Rows) -> str | None:
    """The fused update's error against float64 at most 1.1x the torch chain's (the issue's
    reference; its error is mostly the weight's own rounding), in either solve order."""
    mine = rows[variant].get("validation_rel_err")
    ref = rows.get("torch-chain", {}).get("validation_rel_err")
    if mine is None or ref is None:
        return "no validation_rel_err rows"
    bound = 1.1 * ref[0]
    return None if mine[0] <= bound else f"error {mine[0]:.3g} > 1.1 x chain {ref[0]:.3g}"


COV_SHAPE = "t=65536,d=16384"
UPDATE_SHAPE = "dk=16384,dh=4096,n=10000"
TARGETS = [
    Target(
        4, "covariance, Triton kernel (of dense bf16 GEMM)", "covariance", COV_SHAPE, None,
        "frac_of_dense_gemm", 0.60, lambda v: v == "triton", _always,
    ),
    Target(
        4, "covariance, cuBLAS row panels as dispatched (of dense bf16 GEMM)", "covariance",
        COV_SHAPE, None, "frac_of_dense_gemm", 0.60, lambda v: v == "gemm-panels-1024", _always,
    ),
    Target(
        4, "fused solve/update vs the torch chain", "update", UPDATE_SHAPE, None, "speedup",
        1.5, lambda v: v.startswith("fused-"), _update_error,
    ),
    Target(
        5, "refined layer solve vs float64 torch.linalg.solve", "bench_linalg", "dk=16384",
        "10000", "speedup", 3.0, lambda v: v.startswith("layer_solve"),
        _float64_accurate("published"),
    ),
    Target(
        5, "layer update in the update order vs published (solve, then R U^T)",
        "bench_linalg", "dk=16384", "10000", "speedup", 3.0, lambda v: v == "layer_delta",
        _float64_accurate("published_delta"),
    ),
    Target(
        5, "rank-n factor update vs refactoring", "bench_linalg", "dk=16384", "100",
        "speedup_vs_refactor", 5.0, lambda v: v == "update" or v.startswith("update_"),
        _at_most("rel_diff_refactor", 1e-6),
    ),
]  # fmt: skip


def _time(stamp: str) -> datetime:
    """An ISO time; one without a zone is UTC (the CSVs' timestamps are)."""
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def load(results: Path, name: str, since: datetime | None) -> dict[tuple[str, str, str], Rows]:
    """(device, shape, n) -> the latest value of every (variant, metric) in ``name.csv``."""
    path = results / f"{name}.csv"
    out: dict[tuple[str, str, str], Rows] = {}
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if since is not None and _time(r["timestamp"]) < since:
                continue
            try:
                value = float(r["value"])
            except ValueError:
                continue
            rows = out.setdefault((r["device"], r["shape"], r["n"]), {})
            cell = rows.setdefault(r["variant"], {})
            old = cell.get(r["metric"])
            if old is None or _time(r["timestamp"]) >= _time(old[1]):
                cell[r["metric"]] = (value, r["timestamp"])
    return out


@dataclass
class Verdict:
    target: Target
    device: str
    value: float | None = None
    variant: str = ""
    when: str = ""
    rejected: str = ""  # the fastest variant that failed its accuracy check, and why

    @property
    def status(self) -> str:
        """met; missed (too slow, or no variant accurate enough); not measured (no rows)."""
        if self.value is None:
            return "missed" if self.rejected else "not measured"
        return "met" if self.value >= self.target.threshold else "missed"


def evaluate(target: Target, device: str, rows: Rows | None) -> Verdict:
    out = Verdict(target, device)
    if not rows:
        return out
    best_bad: tuple[float, str, str] | None = None
    for variant in sorted(rows):
        got = rows[variant].get(target.metric)
        if not target.variants(variant) or got is None:
            continue
        why = target.accurate(variant, rows)
        if why is None:
            if out.value is None or got[0] > out.value:
                out.value, out.variant, out.when = got[0], variant, got[1]
        elif best_bad is None or got[0] > best_bad[0]:
            best_bad = (got[0], variant, why)
    if best_bad is not None and (out.value is None or best_bad[0] > out.value):
        out.rejected = f"{best_bad[1]} {best_bad[0]:.3g} ({best_bad[2]})"
    return out


def verdicts(results: Path, devices: list[str] | None, since: datetime | None) -> list[Verdict]:
    tables = {name: load(results, name, since) for name in {t.csv for t in TARGETS}}
    seen = sorted({dev for table in tables.values() for dev, _, _ in table})
    if devices:
        chosen = [d for d in seen if any(s in d for s in devices)] or devices
    else:
        chosen = [d for d in seen if not d.startswith("cpu")]
    out = []
    for dev in chosen:
        for t in TARGETS:
            table = tables[t.csv]
            rows = None
            for (d, shape, n), r in table.items():
                if d == dev and shape == t.shape and (t.n is None or n == t.n):
                    rows = r
            out.append(evaluate(t, dev, rows))
    return out


def markdown(vs: list[Verdict]) -> str:
    lines = [
        "| device | issue | target | threshold | measured | best variant | verdict |"
        " faster, not counted (why) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in vs:
        t = v.target
        measured = "-" if v.value is None else f"{v.value:.3g}"
        lines.append(
            f"| {v.device} | {t.issue} | {t.name} | {t.threshold:g} | {measured} | "
            f"{v.variant or '-'} | {v.status} | {v.rejected or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("OUT") or REPO / "benchmarks" / "results"
    ap.add_argument("--results", type=Path, default=Path(default))
    ap.add_argument(
        "--device", action="append", help="part of a device name (repeatable); default every GPU"
    )
    ap.add_argument("--since", type=_time, help="only rows at or after this ISO time")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every target is met")
    args = ap.parse_args(argv)
    vs = verdicts(args.results, args.device, args.since)
    if not vs:
        print(f"no GPU rows in {args.results}" + (f" since {args.since}" if args.since else ""))
        return 1 if args.strict else 0
    print("### targets\n")
    print(markdown(vs))
    if args.strict and any(v.status != "met" for v in vs):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
