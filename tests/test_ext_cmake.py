"""CMakeLists.txt: configure and build csrc/ as a library with its C++ test, against the
installed torch (torch.utils.cmake_prefix_path), and run ctest. Skips where cmake is
absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils

from memit_fast import _toolchain

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    run(
        [
            "cmake", "-S", str(REPO), "-B", str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        REPO,
    )  # fmt: skip
    run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")], REPO)
    r = run(["ctest", "--test-dir", str(build), "--output-on-failure"], REPO)
    assert "100% tests passed" in r.stdout, r.stdout
    # The library shares libtorch's libstdc++ (memit_fast/_toolchain.py says why).
    (lib,) = build.glob("libmemit_fast_linalg.*")
    if _toolchain.needed(str(lib)) is not None:
        assert _toolchain.has_cxx_runtime(str(lib)), _toolchain.needed(str(lib))
