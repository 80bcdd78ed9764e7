"""Where the time of the layer's factor update and solve goes: the torch profiler's table of
the kernels (by device time) for ``cholesky_update`` and ``LayerSolver.solve`` on the
statistics of ``bench_linalg.py``. For a lent GPU; runs anywhere.

    python benchmarks/profile_linalg.py --device cuda --dk 16384 --n 100 --trsm library,blocked \
        --out "$OUT/profile_linalg.md"

``--trsm`` profiles the extension's triangular solves as the library's ``trsm``
(``MEMIT_FAST_TRSM=library``) and/or as GEMMs with inverted diagonal blocks (``=blocked``,
the default on CUDA); the variable is read at each call.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_linalg import LAM, keys, synthetic_stats  # noqa: E402
from memit_fast import linalg as la  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dk", type=int, default=16384)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--methods", default="product,auto", help="cholesky_update methods")
    p.add_argument("--rows", type=int, default=12, help="rows of each table")
    p.add_argument("--trsm", default="library", help="library and/or blocked (comma-separated)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args()
    trsms = [t for t in args.trsm.split(",") if t]
    if not trsms or not set(trsms) <= {"library", "blocked"}:
        p.error("--trsm takes library and/or blocked")
    device = torch.device(args.device)
    C = synthetic_stats(args.dk, device)
    solver = la.LayerSolver(C, LAM)
    K = keys(args.dk, args.n, C).double()
    cases = [
        (f"cholesky_update {m}", lambda m=m: la.cholesky_update(solver.L, K, method=m))
        for m in args.methods.split(",")
    ]
    cases.append((f"LayerSolver.solve (update: {solver.prefers_update(args.n)})",
                  lambda: solver.solve(K)))  # fmt: skip
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    parts = []
    for trsm in trsms:
        os.environ["MEMIT_FAST_TRSM"] = trsm  # read by the extension at each call
        for name, fn in cases:
            fn()  # warm-up (library handles, first launches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            table = prof.key_averages().table(
                sort_by=sort, row_limit=args.rows, max_name_column_width=60
            )
            part = f"### {name}, trsm {trsm}, dk={args.dk}, n={args.n}, {device}\n\n```\n"
            part += f"{table}\n```\n"
            print(part, flush=True)
            parts.append(part)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(parts))


if __name__ == "__main__":
    main()
