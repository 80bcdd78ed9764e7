"""MEMIT's layer update: the fused solve/update and ``W += R U^T`` against the torch chain.

    # GPU: the issue's size (dk = 16384, dh = 4096, n = 10,000; bf16 weight), validated first
    python benchmarks/bench_update.py --device cuda
    # CPU (or --small anywhere): the references only, at small sizes
    python benchmarks/bench_update.py

Given ``L`` (fp32 lower Cholesky factor of ``A = lambda C + K K^T``), ``K (dk, n)``,
``R (dh, n)`` and a weight ``W (dh, dk)``, each variant computes ``W += R (A^-1 K)^T``:

- ``torch-chain``: ``torch_fused_solve_update``: ``cholesky_solve`` (fp32) + ``matmul`` +
  add, the dense update materialized in fp32;
- ``fused-triton[-bB]``: ``triton_fused_solve_update``, blocked triangular solves on Triton
  bf16x6 GEMMs (diagonal block width ``B``), then the Triton rank-n update;
- ``fused-triton-bB-bf16x3`` (and ``lowrank-triton-bf16x3``): the same with the 3-pass
  split (``--precisions``), half the tensor-core work, products good to about 2^-16;
- ``fused-cublas-split-bB``: the same blocked solve and the update, each GEMM one cuBLAS
  bf16 GEMM over the six split products (the arithmetic of ``bf16x6``);
- ``fused-cublas``: the same blocked solve with fp32 cuBLAS GEMMs (``addmm``), then the
  Triton rank-n update;
- ``...-update`` (``--orders``): each of these solving for the ``dh`` columns of ``K R^T``
  instead of the ``n`` keys (``order="update"``; ``dW^T = A^-1 K R^T``, then one add), and
  ``torch-chain-update``, the torch chain in that order (``cholesky_solve(K R^T)`` + add):
  the same result with ``2 dk^2 (n - dh)`` fewer flops when ``dh < n``. Speedups are over
  ``torch-chain`` (the issue's baseline); the ``-update`` rows also report
  ``speedup_same_order`` over ``torch-chain-update``, which separates the kernels' gain
  from the reordering's.

and, for the update alone (``U`` given, fp32): ``lowrank-torch`` (``torch_lowrank_update``)
and ``lowrank-triton`` (``triton_lowrank_update``).

Every kernel variant is checked against the float64 result on the same inputs before it is
timed. Rows (``<results>/update.csv``): ``ms`` (median, p20, p80), ``TFLOP/s`` (solve
``2 dk^2 n`` + update ``2 dh dk n``, or ``2 dk^2 dh`` + ``2 dh dk n`` for the ``-update``
order: the flops each variant does; each fp32 product counted once), ``speedup`` over
``torch-chain`` (or ``lowrank-torch``), ``GB/s`` for the update alone (``W`` read and
written once, ``R`` and ``U`` read once) and ``frac_of_peak`` (TFLOP/s over the datasheet
dense bf16 peak / 6, the ceiling of fp32 products made of six bf16 ones, where the device is
known).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memit_fast.kernels import torch_fused_solve_update, torch_lowrank_update  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    DTYPES,
    add_output_args,
    bf16_peak,
    device_name,
    make_row,
    parse_kernel_args,
    report,
    time_fn,
    timing_rows,
)


def fp32_emulated_peak(device: str) -> float | None:
    """Dense bf16 peak / 6: what fp32 products through ``bf16x6`` can reach at best."""
    peak = bf16_peak(device)
    return None if peak is None else peak / 6


def make_problem(dk: int, dh: int, n: int, w_dtype: torch.dtype, device: torch.device):
    """``L`` of ``A = lambda C + K K^T`` with ``C`` the second moment of random keys (rank
    ``min(dk, 4096)`` plus a ridge), lambda scaled like MEMIT's against the keys; ``K``,
    ``R``, ``W``."""
    g = torch.Generator(device=device).manual_seed(0)
    m = min(dk, 4096)
    keys = torch.randn(dk, m, device=device, generator=g)
    C = keys @ keys.T / m
    C.diagonal().add_(0.1)
    del keys
    K = torch.randn(dk, n, device=device, generator=g)
    A = C.mul_(15000.0 / dk)  # lambda C, in place
    A.addmm_(K, K.T)
    L = torch.linalg.cholesky(A)
    del A, C
    R = torch.randn(dh, n, device=device, generator=g) / n**0.5
    W = (torch.randn(dh, dk, device=device, generator=g) / 64).to(w_dtype)
    return L, K, R, W


def rel_error(W: torch.Tensor, W0: torch.Tensor, exact_dW: torch.Tensor) -> float:
    dW = W.to(torch.float64) - W0.to(torch.float64)
    return ((dW - exact_dW).norm() / exact_dW.norm()).item()


def run(args) -> list[dict[str, object]]:
    device = torch.device(args.device)
    w_dtype = DTYPES[args.dtype]
    kernels_too = device.type == "cuda" or args.interpret
    if device.type != "cuda" or args.small:
        dk, dh, n = args.small_dk, args.small_dh, args.small_n
    else:
        dk, dh, n = args.dk, args.dh, args.n
    dev = device_name(device)
    L, K, R, W0 = make_problem(dk, dh, n, w_dtype, device)
    common = dict(
        device=dev, benchmark="update", dtype=args.dtype, n=n, shape=f"dk={dk},dh={dh},n={n}"
    )
    solve_flops, update_flops = 2.0 * dk * dk * n, 2.0 * dh * dk * n
    update_bytes = 2 * W0.numel() * W0.element_size() + (R.numel() + K.numel()) * 4
    peak = fp32_emulated_peak(dev)
    rows: list[dict[str, object]] = []
    timings: dict[str, float] = {}

    def add(
        variant: str,
        fn,
        flops: float,
        base: str | None,
        nbytes: float | None = None,
        same_order: str | None = None,
    ) -> None:
        tm = time_fn(fn, device)
        ms = tm["median_ms"]
        timings[variant] = ms
        rows.extend(timing_rows(variant, tm, **common))
        tflops = flops / ms / 1e9
        rows.append(
            make_row(variant=variant, metric="throughput", value=tflops, unit="TFLOP/s", **common)
        )
        if nbytes is not None:
            rows.append(
                make_row(
                    variant=variant,
                    metric="bandwidth",
                    value=nbytes / ms / 1e6,
                    unit="GB/s",
                    **common,
                )
            )
        if peak is not None:
            rows.append(
                make_row(
                    variant=variant, metric="frac_of_peak", value=tflops / peak, unit="", **common
                )
            )
        for metric, ref in (("speedup", base), ("speedup_same_order", same_order)):
            if ref is not None and ref in timings:
                rows.append(
                    make_row(
                        variant=variant, metric=metric, value=timings[ref] / ms, unit="x", **common
                    )
                )

    errors: dict[str, float] = {}

    def check(variant: str, W: torch.Tensor, baseline: str | None, factor: float = 4.0) -> None:
        """Relative error of the update against float64: at most ``factor`` x the torch
        baseline's (plus a hair); for the baselines themselves, sane (5 %, or 4x W's own
        rounding)."""
        err = rel_error(W, W0, exact_dW)
        if baseline is None:
            bound = max(0.05, 4 * rounding)
        else:
            bound = factor * errors[baseline] + 1e-6
        if not (err <= bound):  # NaN fails too
            raise SystemExit(
                f"validation failed: {variant}: relative error {err:.3e} > {bound:.3e}"
            )
        errors[variant] = err
        rows.append(
            make_row(variant=variant, metric="validation_rel_err", value=err, unit="", **common)
        )

    # The exact update, in float64 (from the fp32 inputs that every variant reads).
    U64 = torch.cholesky_solve(K.to(torch.float64), L.to(torch.float64))
    exact_dW = R.to(torch.float64) @ U64.T
    U32 = U64.to(torch.float32)
    del U64
    # Rounding W0 + dW into W's dtype alone costs this much of dW, relatively.
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[w_dtype]
    rounding = (unit * (W0.to(torch.float64) + exact_dW).norm() / exact_dW.norm()).item()

    W = W0.clone()
    torch_fused_solve_update(W, L, K, R, False)
    check("torch-chain", W, None)
    add(
        "torch-chain",
        lambda: torch_fused_solve_update(W, L, K, R, False),
        solve_flops + update_flops,
        None,
    )
    solve_flops_update = 2.0 * dk * dk * dh  # the solve for the columns of K R^T
    if "update" in args.orders:
        W.copy_(W0)
        torch_fused_solve_update(W, L, K, R, False, order="update")
        check("torch-chain-update", W, "torch-chain", factor=8.0)
        add(
            "torch-chain-update",
            lambda: torch_fused_solve_update(W, L, K, R, False, order="update"),
            solve_flops_update + update_flops,
            "torch-chain",
        )
    W.copy_(W0)
    torch_lowrank_update(W, R, U32, False)
    check("lowrank-torch", W, None)
    add(
        "lowrank-torch",
        lambda: torch_lowrank_update(W, R, U32, False),
        update_flops,
        None,
        update_bytes,
    )
    if kernels_too:
        from memit_fast.kernels.update import triton_fused_solve_update, triton_lowrank_update

        W.copy_(W0)
        triton_lowrank_update(W, R, U32, False)
        check("lowrank-triton", W, "lowrank-torch")
        add(
            "lowrank-triton",
            lambda: triton_lowrank_update(W, R, U32, False),
            update_flops,
            "lowrank-torch",
            update_bytes,
        )
        if "bf16x3" in args.precisions and device.type == "cuda":
            from memit_fast.kernels.update import lowrank_operands, plan_lowrank_update

            def lowrank_bf16x3():
                Wm, P, Q = lowrank_operands(W, R, U32, False)
                for launch in plan_lowrank_update(Wm, P, Q, precision="bf16x3"):
                    launch.run()

            W.copy_(W0)
            lowrank_bf16x3()
            check("lowrank-triton-bf16x3", W, "lowrank-torch")
            add(
                "lowrank-triton-bf16x3",
                lowrank_bf16x3,
                update_flops,
                "lowrank-torch",
                update_bytes,
            )
        variants = []
        for p in args.precisions:
            suffix = "" if p == "bf16x6" else f"-{p}"
            variants += [(f"fused-triton-b{b}{suffix}", "triton", b, p) for b in args.solve_blocks]
        variants.append(("fused-cublas", "cublas", None, None))
        variants += [
            (f"fused-cublas-split-b{b}", "cublas-split", b, None) for b in args.solve_blocks
        ]
        for order in args.orders:
            for variant, backend, block, prec in variants:
                if order == "update":
                    variant += "-update"
                kw = dict(solve_block=block, gemm_backend=backend, precision=prec, order=order)
                W.copy_(W0)
                triton_fused_solve_update(W, L, K, R, False, **kw)
                # The blocked solve's inverted diagonal blocks cost a few times fp32
                # substitution's error (kernels/README.md): 8x, as in the tests.
                check(variant, W, "torch-chain", factor=8.0)

                def fn(kw=kw):
                    triton_fused_solve_update(W, L, K, R, False, **kw)

                if order == "update":
                    flops, same = solve_flops_update + update_flops, "torch-chain-update"
                else:
                    flops, same = solve_flops + update_flops, None
                add(variant, fn, flops, "torch-chain", same_order=same)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="the weight's dtype"
    )
    ap.add_argument("--dk", type=int, default=16384)
    ap.add_argument("--dh", type=int, default=4096)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument(
        "--solve-blocks", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024]
    )
    ap.add_argument(
        "--precisions",
        type=lambda v: v.split(","),
        default=["bf16x6", "bf16x3"],
        help="tl.dot precisions of the fused variants' fp32 GEMMs (GPU)",
    )
    ap.add_argument(
        "--orders",
        type=lambda v: v.split(","),
        default=["keys", "update"],
        help="right-hand sides of the fused variants' solve: the keys, the columns of K R^T",
    )
    ap.add_argument("--small", action="store_true", help="small sizes (always on CPU)")
    ap.add_argument("--small-dk", type=int, default=512)
    ap.add_argument("--small-dh", type=int, default=256)
    ap.add_argument("--small-n", type=int, default=64)
    add_output_args(ap, "update", kernels="kernels")
    args = parse_kernel_args(ap, argv)
    return report(args, run(args))


if __name__ == "__main__":
    raise SystemExit(main())
