"""``C += X^T X`` over a batch of keys: the Triton kernel against the torch reference.

    # GPU: the issue's size (validated first, then timed), bf16 keys
    python benchmarks/bench_covariance.py --device cuda --d 16384 --t 65536 --dtype bfloat16
    # CPU (or --small anywhere): the reference only, at small sizes, so the script cannot rot
    python benchmarks/bench_covariance.py

On CUDA it first checks the kernel's lower triangle against ``torch_covariance_accumulate``
(fp32 ``addmm``) on the same batch, then times, with ``triton.testing.do_bench``:

- ``triton`` / ``triton-masked``: ``triton_covariance_accumulate`` (lower triangle of
  tiles; the mask keeps about 90 % of the rows, as padding does);
- ``torch-reference``: ``torch_covariance_accumulate`` (fp32 cast + ``addmm``);
- ``gemm-panels-P[-masked]``: ``gemm_covariance_accumulate``, cuBLAS GEMMs on row panels
  of width ``P`` of the lower triangle, 16-bit operands with fp32 output (16-bit keys);
- ``dense-gemm``: ``torch.mm(X^T, X)`` in ``X``'s dtype, the device's measured dense GEMM
  rate, the yardstick of the acceptance target (kernel >= 60 % of it, symmetric flops
  counted once).

Rows (``<results>/covariance.csv``): ``ms`` (median; p20/p80 too), ``TFLOP/s`` with the
symmetric flops counted once (``t d (d + 1)``; the dense GEMM with its ``2 t d^2``),
``frac_of_dense_gemm`` (achieved TFLOP/s / the dense GEMM's), and ``frac_of_peak`` against
the datasheet dense 16-bit peak (a sixth of it for fp32 keys) where the device is known.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memit_fast.kernels import covariance_finalize, torch_covariance_accumulate  # noqa: E402
from memit_fast.kernels.covariance_gemm import (  # noqa: E402
    gemm_covariance_accumulate,
    mm_has_out_dtype,
)

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


def nominal_peak(device: str, dtype: torch.dtype) -> float | None:
    """The dense 16-bit peak; for fp32 keys a sixth of it (the kernel's fp32 products are
    six bf16 ones, ``bf16x6``)."""
    peak = bf16_peak(device)
    if peak is None:
        return None
    return peak / 6 if dtype == torch.float32 else peak


def validate(C: torch.Tensor, Cref: torch.Tensor, X: torch.Tensor, mask: torch.Tensor) -> float:
    """Max error of the kernel's lower triangle against the reference, relative to the
    largest diagonal element; raises when it exceeds fp32 accumulation noise."""
    err = (C.tril() - Cref.tril()).abs().max().item()
    scale = Cref.diagonal().abs().max().item()
    bound = 64 * X.shape[0] ** 0.5 * 2.0**-24 * scale + 1e-30
    if not torch.isfinite(C.tril()).all() or err > bound:
        raise SystemExit(f"validation failed: max |kernel - reference| = {err:.3e} > {bound:.3e}")
    return err / max(scale, 1e-30)


def run(args) -> list[dict[str, object]]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    kernels_too = device.type == "cuda" or args.interpret
    if device.type != "cuda" or args.small:
        d, t = args.small_d, args.small_t
    else:
        d, t = args.d, args.t
    dev = device_name(device)
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(t, d, device=device, dtype=dtype, generator=g)
    mask = torch.rand(t, device=device, generator=g) < 0.9
    common = dict(device=dev, benchmark="covariance", dtype=args.dtype, n=t, shape=f"t={t},d={d}")
    sym_flops = t * d * (d + 1)
    peak = nominal_peak(dev, dtype)
    rows = []
    timings = {}

    def add(variant: str, fn, flops: float) -> None:
        tm = time_fn(fn, device)
        timings[variant] = (tm, flops / tm["median_ms"] / 1e9)
        rows.extend(timing_rows(variant, tm, **common))
        rows.append(
            make_row(
                variant=variant,
                metric="throughput",
                value=timings[variant][1],
                unit="TFLOP/s",
                **common,
            )
        )
        if peak is not None:
            rows.append(
                make_row(
                    variant=variant,
                    metric="frac_of_peak",
                    value=timings[variant][1] / peak,
                    unit="",
                    **common,
                )
            )

    C = torch.zeros(d, d, device=device)
    add("torch-reference", lambda: torch_covariance_accumulate(C, X, None), sym_flops)
    if kernels_too:
        from memit_fast.kernels.covariance import triton_covariance_accumulate

        Ck, Cref = torch.zeros(d, d, device=device), torch.zeros(d, d, device=device)
        kept = int(mask.sum())
        variants = ["torch-reference"]

        def checked(name: str, accumulate) -> None:
            """Validate ``accumulate(C, X, m)`` against the reference, without and with the
            mask, then time both (variants ``name`` and ``name-masked``)."""
            for m, variant in ((None, name), (mask, f"{name}-masked")):
                Ck.zero_()
                Cref.zero_()
                accumulate(Ck, X, m)
                torch_covariance_accumulate(Cref, X, m)
                rel = validate(Ck, Cref, X, m)
                rows.append(
                    make_row(
                        variant=variant,
                        metric="validation_max_rel_err",
                        value=rel,
                        unit="",
                        **common,
                    )
                )
                flops = sym_flops if m is None else kept * d * (d + 1)
                add(variant, lambda m=m: accumulate(C, X, m), flops)
                variants.append(variant)

        checked("triton", triton_covariance_accumulate)
        covariance_finalize(Ck)  # the finalize of a pass (Ck: the masked kernel's), checked once
        if not torch.equal(Ck, Ck.T):
            raise SystemExit("validation failed: finalize left C asymmetric")
        if X.dtype != torch.float32 and (device.type != "cuda" or mm_has_out_dtype("cuda")):
            # cuBLAS row panels (16-bit operands, fp32 output), validated like the kernel.
            for panel in args.panels:
                checked(
                    f"gemm-panels-{panel}",
                    lambda C_, X_, m_, p=panel: gemm_covariance_accumulate(C_, X_, m_, panel=p),
                )
        add("dense-gemm", lambda: torch.mm(X.T, X), 2.0 * t * d * d)
        gemm = timings["dense-gemm"][1]
        for variant in variants:
            frac = timings[variant][1] / gemm
            rows.append(
                make_row(
                    variant=variant, metric="frac_of_dense_gemm", value=frac, unit="", **common
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--d", type=int, default=16384)
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--small", action="store_true", help="small sizes (always on CPU)")
    ap.add_argument("--small-d", type=int, default=512)
    ap.add_argument("--small-t", type=int, default=2048)
    ap.add_argument(
        "--panels",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1024, 2048, 4096],
        help="row-panel widths of the cuBLAS variant",
    )
    add_output_args(ap, "covariance", kernels="kernel")
    args = parse_kernel_args(ap, argv)
    return report(args, run(args))


if __name__ == "__main__":
    raise SystemExit(main())
