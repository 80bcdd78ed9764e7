"""Block-configuration sweep of the Triton kernels on a GPU (what the config tables in
``kernels/covariance.py`` and ``kernels/update.py`` are chosen from).

    python benchmarks/tune_kernels.py --budget-s 120        # on a CUDA device

For each candidate ``KernelConfig`` of each op, at the benchmarks' sizes: run once, check
against the torch reference (a config that is wrong or does not compile is reported and
skipped), then time with ``do_bench``. Rows go to ``<results>/kernel_tune.csv`` (variant =
the op and its config, ``current`` marking the table's entry), and a table is printed. The
sweep stops starting new configs when ``--budget-s`` is spent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    append_rows,
    device_name,
    make_row,
    markdown_table,
    synchronize,
    time_fn,
)


def cfg_name(c) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k} g{c.group} w{c.num_warps} s{c.num_stages}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--ops", default="covariance,lowrank,solve_gemm")
    ap.add_argument("--d", type=int, default=16384)
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--dk", type=int, default=16384)
    ap.add_argument("--dh", type=int, default=4096)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--csv", default="kernel_tune")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="CPU smoke run under TRITON_INTERPRET=1 (give small sizes); not a timing",
    )
    args = ap.parse_args(argv)
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--interpret needs TRITON_INTERPRET=1 in the environment")
    elif not torch.cuda.is_available():
        print("tune_kernels.py: needs a CUDA device (or --interpret)", file=sys.stderr)
        return 2

    from memit_fast.kernels import _launch, covariance, update
    from memit_fast.kernels._launch import KernelConfig as KC

    dev = torch.device("cpu" if args.interpret else "cuda")
    base = dict(device=device_name(dev), benchmark="kernel_tune")  # every row's
    arch = _launch.arch_of(dev)
    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    g = torch.Generator(device=dev).manual_seed(0)

    def sweep(op: str, shape: str, flops: float, current, candidates, run_cfg, check) -> None:
        seen = []
        for c in [current, *candidates]:
            if c in seen:
                continue
            seen.append(c)
            if time.perf_counter() - start > args.budget_s:
                print(f"{op}: budget spent, {cfg_name(c)} not tried", flush=True)
                continue
            variant = f"{op} {cfg_name(c)}" + (" current" if c == current else "")
            common = dict(**base, shape=shape, variant=variant)
            t0 = time.perf_counter()
            try:
                run_cfg(c)
                synchronize(dev)
                err = check()
                tm = time_fn(lambda c=c: run_cfg(c), dev)
            except Exception as e:  # a config that does not compile or fit is data here
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                print(f"{variant}: FAILED {msg}", flush=True)
                rows.append(make_row(metric="failed", value=msg, unit="", **common))
                continue
            tflops = flops / tm["median_ms"] / 1e9
            print(
                f"{variant}: {tm['median_ms']:.3f} ms, {tflops:.1f} TFLOP/s, rel err {err:.2e} "
                f"(compile + check + time {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            rows.append(make_row(metric="ms", value=tm["median_ms"], unit="ms", **common))
            rows.append(make_row(metric="throughput", value=tflops, unit="TFLOP/s", **common))
            rows.append(make_row(metric="rel_err", value=err, unit="", **common))

    ops = args.ops.split(",")
    if "covariance" in ops:
        d, t = args.d, args.t
        xdt = torch.float16 if args.interpret else torch.bfloat16  # the interpreter: no bf16
        X = torch.randn(t, d, device=dev, dtype=xdt, generator=g)
        C = torch.zeros(d, d, device=dev)
        ref = torch.zeros(d, d, device=dev)
        ref.addmm_(X.T.float(), X.float())  # fp32 reference on this batch
        ref_scale = ref.diagonal().abs().max()
        gemm = time_fn(lambda: torch.mm(X.T, X), dev)["median_ms"]
        gemm_tflops = 2.0 * t * d * d / gemm / 1e9
        shape = f"t={t},d={d},{'fp16' if args.interpret else 'bf16'}"
        print(f"dense bf16 GEMM X^T X: {gemm:.3f} ms, {gemm_tflops:.1f} TFLOP/s", flush=True)
        rows.append(
            make_row(
                **base,
                shape=shape,
                variant="dense-gemm",
                metric="throughput",
                value=gemm_tflops,
                unit="TFLOP/s",
            )  # fmt: skip
        )

        def run_cov(c):
            C.zero_()
            for launch in covariance.plan_covariance_accumulate(C, X, None, config=c):
                launch.run()

        def check_cov():
            return float((C.tril() - ref.tril()).abs().max() / ref_scale)

        cur = covariance.covariance_config(arch, torch.bfloat16)
        cands = [
            KC(128, 128, 64, 8, 8, 3),
            KC(128, 128, 64, 16, 8, 4),
            KC(128, 128, 64, 4, 8, 4),
            KC(128, 128, 32, 8, 4, 4),
            KC(128, 128, 64, 8, 4, 3),
            KC(128, 128, 128, 8, 8, 2),
        ]
        sweep("covariance", shape, t * d * (d + 1), cur, cands, run_cov, check_cov)
        del X, C, ref

    if "lowrank" in ops or "solve_gemm" in ops:
        dk, dh, n = args.dk, args.dh, args.n
        W0 = (torch.randn(dh, dk, device=dev, generator=g) / 64).to(torch.bfloat16)
        R = torch.randn(dh, n, device=dev, generator=g) / n**0.5
        U = torch.randn(dk, n, device=dev, generator=g) / n**0.5
        W = W0.clone()
        exact = R.double() @ U.double().T
        shape = f"dk={dk},dh={dh},n={n},W bf16"

        if "lowrank" in ops:

            def run_lr(c):
                W.copy_(W0)
                Wm, P, Q = update.lowrank_operands(W, R, U, False)
                for launch in update.plan_lowrank_update(Wm, P, Q, config=c):
                    launch.run()

            def check_lr():
                dW = W.double() - W0.double()
                return float((dW - exact).norm() / exact.norm())

            cur = update.LOWRANK_CONFIGS[(arch, "fp32")]
            cands = [
                KC(128, 128, 32, 8, 4, 3),
                KC(128, 64, 32, 8, 4, 4),
                KC(128, 128, 32, 8, 8, 4),
                KC(128, 128, 64, 8, 8, 2),
                KC(64, 128, 32, 8, 4, 4),
            ]
            sweep("lowrank", shape, 2.0 * dh * dk * n, cur, cands, run_lr, check_lr)

        if "solve_gemm" in ops:
            # One trailing-update GEMM of the blocked solve at its largest: (dk - b) x n
            # -= (dk - b) x b @ b x n (b the diagonal block width), fp32 operands (bf16x6).
            b = min(update.SOLVE_BLOCKS[arch], dk // 2)
            A = torch.randn(dk - b, b, device=dev, generator=g)
            B = torch.randn(b, n, device=dev, generator=g)
            Cg = torch.zeros(dk - b, n, device=dev)
            exact_g = A.double() @ B.double()
            step = update.GemmStep(Cg, A, B, subtract=False)

            def run_g(c):
                step.launch(c).run()

            def check_g():
                return float((Cg.double() - exact_g).norm() / exact_g.norm())

            cur = update.SOLVE_GEMM_CONFIGS[arch]
            cands = [
                KC(128, 128, 32, 8, 4, 3),
                KC(128, 128, 32, 8, 8, 4),
                KC(128, 64, 32, 8, 4, 4),
                KC(128, 128, 64, 8, 8, 2),
            ]
            sweep(
                "solve_gemm",
                f"{dk - b}x{b}x{n}",
                2.0 * (dk - b) * b * n,
                cur,
                cands,
                run_g,
                check_g,
            )
            tm = time_fn(lambda: torch.mm(A, B, out=Cg), dev)["median_ms"]
            tf = 2.0 * (dk - b) * b * n / tm / 1e9
            print(f"solve_gemm cuBLAS fp32: {tm:.3f} ms, {tf:.1f} TFLOP/s", flush=True)
            rows.append(
                make_row(
                    **base,
                    shape=f"{dk - b}x{b}x{n}",
                    variant="solve_gemm cublas-fp32",
                    metric="ms",
                    value=tm,
                    unit="ms",
                )  # fmt: skip
            )

    path = append_rows(args.csv, rows)
    print(f"appended {len(rows)} rows to {path}")
    print(markdown_table(rows, ["shape", "variant", "metric", "value", "unit"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
