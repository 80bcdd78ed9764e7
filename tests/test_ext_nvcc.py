"""Compile check of the CUDA sources of memit_fast._C: nvcc for sm_90 against the
installed torch's headers, compile-only, so the CUDA code cannot rot on machines without
a GPU. Skips only where nvcc is absent."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


def nvcc_command(source: Path, out: Path) -> list[str]:
    include = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(REPO / "csrc")]
    cmd = [
        "nvcc", "-c", str(source), "-o", str(out),
        "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
        "-gencode", "arch=compute_90,code=sm_90",
        "--expt-relaxed-constexpr",
        # what torch.utils.cpp_extension passes to nvcc for extensions
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DTORCH_EXTENSION_NAME=_C",
        *[f"-I{p}" for p in include],
    ]  # fmt: skip
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU build of torch ships the c10/cuda headers without this generated one.
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    cmd = nvcc_command(source, tmp_path / (source.stem + ".o"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, (
        f"nvcc failed on {source.name} (torch {torch.__version__}):\n{r.stderr}"
    )
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/*.cu: the CUDA kernels of memit_fast._C are missing"
