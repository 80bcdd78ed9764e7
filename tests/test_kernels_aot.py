"""Every kernel compiles ahead of time for sm_90 and sm_80 with the block configurations its
launcher uses (no GPU needed); on sm_90 the covariance kernel runs on wgmma.

The compiling happens in a child process (``python -m memit_fast.kernels.aot``) without
TRITON_INTERPRET, which conftest sets when there is no GPU and under which Triton compiles
nothing; the launches it compiles are built by the same plan functions as here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from memit_fast.kernels import aot, covariance, update  # noqa: E402

ARCHS = sorted(aot.SHARED_MEMORY_LIMIT)
LAUNCHES = {arch: aot.representative_launches(arch) for arch in ARCHS}


def _cases(size: str):
    return [
        pytest.param(arch, name, id=f"sm{arch}-{name}")
        for arch in ARCHS
        for name in LAUNCHES[arch]
        if f"/{size}/" in name
    ]


def _compile_report(size: str, tmp_path_factory) -> dict[tuple[int, str], dict]:
    """Compile in one child process per architecture, side by side."""
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    runs = []
    for arch in ARCHS:
        out = tmp / f"sm{arch}-{size}.json"
        cmd = [sys.executable, "-m", "memit_fast.kernels.aot", "--arch", str(arch)]
        cmd += ["--size", size, "--json", str(out)]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        runs.append((cmd, out, proc))
    report = {}
    for cmd, out, proc in runs:
        log, _ = proc.communicate(timeout=900)
        if not out.exists():
            pytest.fail(f"{' '.join(cmd)} wrote no report:\n{log}")
        report.update({(r["arch"], r["name"]): r for r in json.loads(out.read_text())})
    return report


@pytest.fixture(scope="session")
def aligned_report(tmp_path_factory):
    return _compile_report("aligned", tmp_path_factory)


@pytest.fixture(scope="session")
def odd_report(tmp_path_factory):
    return _compile_report("odd", tmp_path_factory)


def matrix_operands(launch) -> list[torch.Tensor]:
    """The tensors that feed the MMAs: ``X`` for the covariance kernel (its third argument
    is the mask), the two factors otherwise."""
    ops = launch.args[1:2] if launch.kernel is covariance._covariance_kernel else launch.args[1:3]
    return [a for a in ops if isinstance(a, torch.Tensor)]


def sixteen_bit(launch) -> bool:
    return all(a.dtype in (torch.float16, torch.bfloat16) for a in matrix_operands(launch))


def uses_tensor_cores(launch) -> bool:
    """16-bit operands, or fp32 operands through the bf16x6 split."""
    return sixteen_bit(launch) or launch.constexprs.get("PRECISION") == "bf16x6"


def _check(report: dict, arch: int, name: str) -> None:
    rec = report.get((arch, name))
    assert rec is not None, f"sm_{arch} {name}: not compiled by the child process"
    assert rec["ok"], f"sm_{arch} {name}: compile error: {rec['error']}"
    launch = LAUNCHES[arch][name]
    assert rec["target"], f"{name}: PTX not for sm_{arch}"
    assert rec["num_warps"] == launch.num_warps
    assert rec["shared"] <= aot.SHARED_MEMORY_LIMIT[arch], (
        f"{name}: {rec['shared']} B of shared memory, the sm_{arch} family has "
        f"{aot.SHARED_MEMORY_LIMIT[arch]}"
    )
    if arch == 90 and name.startswith("covariance"):
        assert rec["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
    if uses_tensor_cores(launch):
        key = "wgmma" if arch == 90 else "mma_sync"
        assert rec[key], f"{name}: no {key} in the sm_{arch} PTX"


@pytest.mark.parametrize("arch,name", _cases("aligned"))
def test_compiles(aligned_report, arch, name):
    _check(aligned_report, arch, name)
    rec, launch = aligned_report[(arch, name)], LAUNCHES[arch][name]
    if arch == 90 and uses_tensor_cores(launch):
        # Sizes divisible by 16: the loads must pipeline. (They did not while the sizes were
        # unspecialized; the covariance kernel then ran at 17 % of the dense GEMM rate.)
        assert rec["cp_async"], f"{name}: operand loads are not asynchronous copies"
        if sixteen_bit(launch):
            assert rec["mma_in_flight"], f"{name}: no wgmma group kept in flight"


@pytest.mark.slow
@pytest.mark.parametrize("arch,name", _cases("odd"))
def test_compiles_odd_sizes(odd_report, arch, name):
    _check(odd_report, arch, name)


def test_every_op_and_config_is_covered():
    for arch in ARCHS:
        aligned = {n: lc for n, lc in LAUNCHES[arch].items() if "/aligned/" in n}
        for op in ("covariance/", "lowrank/", "fused_solve_update/", "dense_update/"):
            assert any(n.startswith(op) for n in aligned), (arch, op)
        kernels = {lc.kernel for lc in aligned.values()}
        assert kernels == {
            covariance._covariance_kernel,
            update._lowrank_update_kernel,
            update._gemm_kernel,
            update._add_kernel,
        }
        compiled = {
            (
                lc.constexprs.get("BLOCK_M", lc.constexprs.get("BLOCK")),
                lc.constexprs.get("BLOCK_K", lc.constexprs.get("BLOCK_T")),
                lc.num_warps,
                lc.num_stages,
            )
            for lc in aligned.values()
        }
        tables = [cfg for (a, _), cfg in covariance.COVARIANCE_CONFIGS.items() if a == arch]
        tables += [cfg for (a, _), cfg in update.LOWRANK_CONFIGS.items() if a == arch]
        tables.append(update.SOLVE_GEMM_CONFIGS[arch])
        for cfg in tables:
            assert (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages) in compiled, (
                arch,
                cfg,
            )


def _signature(launches):
    """Kernel, block constexprs and schedule of each launch: everything but PRECISION."""
    return [
        (
            lc.kernel,
            {k: v for k, v in lc.constexprs.items() if k != "PRECISION"},
            lc.num_warps,
            lc.num_stages,
        )
        for lc in launches
    ]


def test_interpreter_runs_the_sm90_configs():
    """CPU tensors (the interpreter in the other kernel tests) get the sm_90 block configs,
    which are the ones compiled above. Only the fp32 dot precision differs: the interpreter
    has no bf16x6 and computes IEEE fp32."""
    for dtype in (torch.float32, torch.float16):
        C, X = torch.zeros(64, 64), torch.zeros(9, 64, dtype=dtype)
        Cm, Xm = C.to("meta"), X.to("meta")
        cpu = covariance.plan_covariance_accumulate(C, X)
        assert _signature(cpu) == _signature(covariance.plan_covariance_accumulate(Cm, Xm, arch=90))
        assert cpu[0].constexprs["PRECISION"] == "ieee"
    W, L = torch.zeros(8, 64, dtype=torch.float16), torch.eye(64)
    K, R = torch.zeros(64, 3), torch.zeros(8, 3)
    cpu = update.plan_fused_solve_update(W, L, K, R, False)
    meta = update.plan_fused_solve_update(*(x.to("meta") for x in (W, L, K, R)), False, arch=90)
    assert _signature(cpu) == _signature(meta)
    assert {lc.constexprs["PRECISION"] for lc in meta} == {"bf16x6"}


def test_specialize_matches_the_jit():
    libtriton = pytest.importorskip("triton._C.libtriton")
    native = getattr(libtriton, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    args = [1, 2, 16, 17, 4096, 2**31 + 16, torch.zeros(4), torch.zeros(3, dtype=torch.bfloat16)]
    args.append(torch.zeros(4, dtype=torch.bool))
    args.append(torch.zeros(8, dtype=torch.float16)[1:])  # 2-byte offset: not 16-aligned
    for a in args:
        # False: an integer parameter in do_not_specialize (the kernels list only sizes).
        for spec_on in (True, False) if isinstance(a, int) else (True,):
            ty, spec = native(BaseBackend, a, False, spec_on, True)[:2]
            assert aot.specialize(a, spec_on) == (ty, spec if spec is not None else ""), (
                a,
                spec_on,
            )


def test_do_not_specialize_is_read_from_the_kernels():
    assert aot._not_specialized(covariance._covariance_kernel) == {"T"}
    assert aot._not_specialized(update._lowrank_update_kernel) == set()
    assert aot._not_specialized(update._gemm_kernel) == set()
