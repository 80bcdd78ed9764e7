"""Ahead-of-time compilation of the kernels for a ``GPUTarget``, without a GPU.

The launchers describe their work as plans (lists of ``Launch``: kernel, grid, arguments,
block config). Here the same plan functions run on ``meta`` tensors of representative shapes
and each distinct launch is compiled with ``triton.compile(ASTSource(...), target=...)``
with the signature, specializations and options the JIT would give it at run time. So CI
compiles for sm_90 and sm_80 exactly the block configurations the launchers use, and can
read the PTX (``compiled.asm["ptx"]``).

    python -m memit_fast.kernels.aot --arch 90     # compile everything for sm_90

Under ``TRITON_INTERPRET=1`` Triton's own library functions are interpreted and nothing
compiles: run this module in a process without it (the tests do).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import covariance, update
from ._launch import Launch, torch_to_triton_dtype

# Shared memory per block that a config may use: sm_90/sm_100 (227 KiB) and, for the
# sm_80 family, the 99 KiB of sm_86/89/120 (the A100's 163 KiB is more).
SHARED_MEMORY_LIMIT = {90: 232448, 80: 101376}


def target_for(arch: int) -> GPUTarget:
    return GPUTarget("cuda", arch, 32)


def specialize(arg: object, specialize: bool = True) -> tuple[str, object]:
    """``(type, specialization)`` of one runtime argument, as Triton's JIT sees it: integers
    equal to 1 become the constant 1; other integers are ``i32`` (``i64``/``u64`` when too
    large) and ``"D"`` when divisible by 16 (neither for a parameter in the kernel's
    ``do_not_specialize``: ``specialize=False``); tensors are pointers, ``"D"`` when
    16-byte aligned."""
    if isinstance(arg, torch.Tensor):
        aligned = arg.device.type == "meta" or arg.data_ptr() % 16 == 0
        return f"*{torch_to_triton_dtype(arg.dtype)}", "D" if aligned else ""
    if isinstance(arg, bool):
        return "i1", ""
    if isinstance(arg, int):
        if arg == 1 and specialize:
            return "constexpr", 1
        ty = "i32" if -(2**31) <= arg < 2**31 else ("u64" if arg >= 2**63 else "i64")
        return ty, "D" if arg % 16 == 0 and specialize else ""
    if isinstance(arg, float):
        return "fp32", ""
    raise TypeError(f"cannot specialize a kernel argument of type {type(arg).__name__}")


def _jit_function(kernel: object) -> JITFunction:
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{kernel!r} is not a JITFunction (TRITON_INTERPRET=1?): compile ahead of time in "
            "a process without the interpreter, e.g. python -m memit_fast.kernels.aot"
        )
    return kernel


def _not_specialized(kernel: object) -> set[str]:
    """Names in the kernel's ``do_not_specialize`` (a JITFunction, or the interpreter's
    wrapper of one)."""
    if isinstance(kernel, JITFunction):
        listed = kernel.do_not_specialize or ()
    else:
        listed = (getattr(kernel, "kwargs", None) or {}).get("do_not_specialize") or ()
    return {kernel.arg_names[x] if isinstance(x, int) else x for x in listed}


def _specialization(launch: Launch) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of one launch, as the JIT would build them."""
    names = launch.kernel.arg_names
    fixed = _not_specialized(launch.kernel)
    runtime = names[: len(launch.args)]
    if set(names[len(launch.args) :]) != set(launch.constexprs):
        raise ValueError(
            f"{launch.kernel}: launch gives constexprs {sorted(launch.constexprs)}, "
            f"kernel declares {names[len(launch.args) :]}"
        )
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int], object] = {}
    attrs: dict[tuple[int], list] = {}
    for i, (name, arg) in enumerate(zip(runtime, launch.args)):
        ty, spec = specialize(arg, name not in fixed)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in launch.constexprs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    return signature, constexprs, attrs


def source_for(launch: Launch) -> tuple[ASTSource, dict[str, int]]:
    """The ``ASTSource`` and compile options of one launch."""
    signature, constexprs, attrs = _specialization(launch)
    src = ASTSource(
        fn=_jit_function(launch.kernel), signature=signature, constexprs=constexprs, attrs=attrs
    )
    return src, {"num_warps": launch.num_warps, "num_stages": launch.num_stages}


def compile_launch(launch: Launch, arch: int):
    """Compile one launch for ``sm_<arch>``; returns Triton's ``CompiledKernel``."""
    src, options = source_for(launch)
    return triton.compile(src, target=target_for(arch), options=options)


def _key(launch: Launch) -> tuple:
    signature, constexprs, attrs = _specialization(launch)
    return (
        launch.kernel.fn.__name__,
        tuple(sorted(signature.items())),
        tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
        tuple(sorted((k, repr(v)) for k, v in attrs.items())),
        launch.num_warps,
        launch.num_stages,
    )


def unique_launches(launches: Iterable[tuple[str, Launch]]) -> dict[str, Launch]:
    """Drop launches that compile to the same kernel binary (keeps the first name)."""
    seen: set[tuple] = set()
    out: dict[str, Launch] = {}
    for name, launch in launches:
        key = _key(launch)
        if key not in seen:
            seen.add(key)
            out[name] = launch
    return out


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def representative_launches(arch: int) -> dict[str, Launch]:
    """Every distinct launch the launchers make for ``sm_<arch>``: each op, each input
    dtype, with and without a mask, at the issue's sizes (every dimension a multiple of
    16) and at odd sizes (nothing divisible by 16), built by the launchers' own plan
    functions on meta tensors."""
    launches: list[tuple[str, Launch]] = []
    sizes = {"aligned": (65536, 16384, 4096, 10000), "odd": (513, 1001, 7, 5)}
    for size, (t, d, dh, n) in sizes.items():
        dk = d
        for dtype in covariance.SUPPORTED_DTYPES:
            dname = torch_to_triton_dtype(dtype)
            for masked in (False, True):
                # Keys whose rows are further apart than d (a slice of wider activations)
                # specialize the row stride differently.
                for wide in (False, True):
                    C = _meta(d, d)
                    X = _meta(t, d + 16, dtype=dtype)[:, :d] if wide else _meta(t, d, dtype=dtype)
                    mask = _meta(t, dtype=torch.bool) if masked else None
                    for i, lc in enumerate(
                        covariance.plan_covariance_accumulate(C, X, mask, arch=arch)
                    ):
                        name = f"covariance/{dname}/mask={masked}/wide={wide}"
                        launches.append((f"{name}/{size}/{i}", lc))
        # Every W dtype with every operand dtype (float64 solutions go in as fp32).
        for w_dtype, op_dtype in itertools.product(
            (torch.float32, torch.float16, torch.bfloat16),
            (torch.float64, torch.float32, torch.float16, torch.bfloat16),
        ):
            W = _meta(dh, dk, dtype=w_dtype)
            R, U = _meta(dh, n, dtype=op_dtype), _meta(dk, n, dtype=op_dtype)
            Wm, P, Q = update.lowrank_operands(W, R, U, transposed=False)
            for i, lc in enumerate(update.plan_lowrank_update(Wm, P, Q, arch=arch)):
                name = f"lowrank/W={torch_to_triton_dtype(w_dtype)}/ops={torch_to_triton_dtype(op_dtype)}"
                launches.append((f"{name}/{size}/{i}", lc))
        # Both solve orders (the right-hand sides are the keys, or the columns of K R^T),
        # the second also with a transposed (Conv1D) weight, whose add reads D untransposed.
        # A bf16 W takes bf16x6 GEMMs, an fp32 W IEEE ones.
        L, K, R = _meta(dk, dk), _meta(dk, n), _meta(dh, n)
        for w_dtype in (torch.bfloat16, torch.float32):
            for order, transposed in [("keys", False), ("update", False), ("update", True)]:
                W = _meta(*((dk, dh) if transposed else (dh, dk)), dtype=w_dtype)
                plan = update.plan_fused_solve_update(
                    W, L, K, R, transposed, arch=arch, order=order
                )
                for i, lc in enumerate(plan):
                    wname = torch_to_triton_dtype(w_dtype)
                    name = f"fused_solve_update/W={wname}/{order}/T={transposed}"
                    launches.append((f"{name}/{size}/{i}", lc))
        # dense_update: the engine's update-order write of its fp32 dW^T (dk, dh), into
        # each weight dtype and both layouts.
        for w_dtype in (torch.float32, torch.float16, torch.bfloat16):
            for transposed in (False, True):
                # W row-major, or column-major (a transposed view, which the dispatch takes).
                for colmajor in (False, True):
                    shape = (dk, dh) if transposed else (dh, dk)
                    W = (
                        _meta(*shape[::-1], dtype=w_dtype).T
                        if colmajor
                        else _meta(*shape, dtype=w_dtype)
                    )
                    lc = update.plan_add_update(W, _meta(dk, dh), transposed)
                    name = (
                        f"dense_update/W={torch_to_triton_dtype(w_dtype)}/T={transposed}"
                        f"/colmajor={colmajor}"
                    )
                    launches.append((f"{name}/{size}/0", lc))
    return unique_launches(launches)


def compile_all(arch: int, size: str | None = None) -> dict[str, object]:
    """Compile every representative launch for ``sm_<arch>`` (only ``size``, ``"aligned"`` or
    ``"odd"``, when given); name -> ``CompiledKernel``."""
    return {
        name: compile_launch(lc, arch)
        for name, lc in representative_launches(arch).items()
        if size is None or f"/{size}/" in name
    }


def report(arch: int, size: str | None = None) -> list[dict[str, object]]:
    """Compile like ``compile_all`` but never stop at an error: one record per launch with
    ``ok``/``error``, shared memory, warps and which matrix instructions the PTX uses."""
    out = []
    for name, lc in representative_launches(arch).items():
        if size is not None and f"/{size}/" not in name:
            continue
        rec: dict[str, object] = {"arch": arch, "name": name}
        try:
            k = compile_launch(lc, arch)
        except Exception as e:  # reported, not raised: the caller decides
            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
        else:
            ptx = k.asm["ptx"]
            rec.update(
                ok=True,
                error="",
                shared=k.metadata.shared,
                num_warps=k.metadata.num_warps,
                target=f".target sm_{arch}" in ptx,
                wgmma="wgmma.mma_async" in ptx,
                mma_sync="mma.sync" in ptx,
                # Operand loads as asynchronous copies (what num_stages pipelines), and an
                # MMA group left in flight while the next one is issued.
                cp_async="cp.async" in ptx,
                mma_in_flight="wgmma.wait_group.sync.aligned 1" in ptx,
            )
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    ap.add_argument("--size", choices=["aligned", "odd"], help="only launches of these sizes")
    ap.add_argument("--json", help="write the per-launch records here (JSON)")
    args = ap.parse_args(argv)
    records = []
    for arch in args.arch or sorted(SHARED_MEMORY_LIMIT):
        records += report(arch, args.size)
    for r in records:
        what = (
            f"shared={r['shared']} B, "
            + ("wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "fma")
            if r["ok"]
            else f"FAILED {r['error']}"
        )
        sys.stdout.write(f"sm_{r['arch']} {r['name']}: {what}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
