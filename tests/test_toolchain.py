"""The extension links the shared libstdc++, as libtorch does (memit_fast/_toolchain.py):
an extension with its own copy crashed at its first TORCH_CHECK on an H200 machine whose
CXX was a wrapper adding -static-libstdc++. setup.py replaces such a compiler, and the
loader refuses such a build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from memit_fast import _ext, _toolchain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GXX = shutil.which("g++")


def _static_runtime_available() -> bool:
    if GXX is None:
        return False
    out = subprocess.run([GXX, "-print-file-name=libstdc++.a"], capture_output=True, text=True)
    return os.path.isabs(out.stdout.strip())


needs_static = pytest.mark.skipif(
    not _static_runtime_available(), reason="no g++ with a static libstdc++ here"
)


@pytest.fixture
def static_wrapper(tmp_path):
    """A compiler wrapper that links every output with -static-libstdc++."""
    path = tmp_path / "static-g++"
    path.write_text(f'#!/bin/sh\nexec {GXX} "$@" -static-libstdc++\n')
    path.chmod(0o755)
    return str(path)


def _ext_origin() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("memit_fast._C")
    return spec.origin if spec is not None else None


def _readelf_needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf here")
def test_needed_matches_readelf():
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    paths = [os.path.join(lib, f) for f in ("libc10.so", "libtorch_cpu.so")]
    paths.append(sys.executable)
    paths += [s for s in (_ext_origin(),) if s]
    for path in paths:
        if os.path.exists(path):
            assert _toolchain.needed(path) == _readelf_needed(path), path
    assert _toolchain.needed(os.path.join(REPO, "setup.py")) is None  # not ELF


@pytest.mark.skipif(_ext_origin() is None, reason="memit_fast._C not built")
def test_built_extension_needs_the_shared_cxx_runtime():
    origin = _ext_origin()
    if _toolchain.needed(origin) is None:
        pytest.skip("not an ELF build")
    assert _toolchain.has_cxx_runtime(origin), _toolchain.needed(origin)


@pytest.mark.skipif(GXX is None, reason="no g++ here")
@needs_static
def test_probe_tells_a_static_runtime_wrapper(static_wrapper):
    assert _toolchain.links_cxx_runtime_dynamically(GXX) is True
    assert _toolchain.links_cxx_runtime_dynamically(static_wrapper) is False
    assert _toolchain.links_cxx_runtime_dynamically("no-such-compiler++") is None


@pytest.mark.skipif(GXX is None, reason="no g++ here")
@needs_static
def test_pick_compiler_replaces_only_a_static_runtime_wrapper(static_wrapper):
    assert _toolchain.pick_compiler(GXX) == (GXX, None, "")
    cxx, cc, why = _toolchain.pick_compiler(static_wrapper)
    assert cxx != static_wrapper and _toolchain.links_cxx_runtime_dynamically(cxx) is True
    assert cc is not None and os.access(cc, os.X_OK)
    assert static_wrapper in why and "statically" in why and cxx in why
    with pytest.raises(RuntimeError, match=r"links libstdc\+\+ statically, and none of"):
        _toolchain.pick_compiler(static_wrapper, fallbacks=(static_wrapper,))


@pytest.mark.skipif(_ext_origin() is None, reason="memit_fast._C not built")
def test_loader_refuses_a_build_with_its_own_cxx_runtime(monkeypatch):
    _ext.load.cache_clear()
    monkeypatch.setattr(_toolchain, "has_cxx_runtime", lambda path: False)
    try:
        with pytest.warns(RuntimeWarning, match=r"its own copy of libstdc\+\+.*torch references"):
            assert _ext.load() is None
        assert not _ext.has_kernel("cholesky", "cpu")
    finally:
        _ext.load.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(GXX is None, reason="no g++ here")
@needs_static
def test_setup_builds_with_the_shared_runtime_under_a_static_wrapper(static_wrapper, tmp_path):
    """The whole build with CXX set to the wrapper: setup.py says it replaced it, the built
    extension needs the shared libstdc++, and its C++ errors arrive whole (built by the
    wrapper, the same check lost the shape from its message here and crashed on the H200
    machine)."""
    env = dict(os.environ, CXX=static_wrapper, MAX_JOBS="2", MEMIT_FAST_NO_CUDA="1")
    out = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{static_wrapper} links libstdc++ statically" in out.stderr
    (so,) = (tmp_path / "lib" / "memit_fast").glob("_C*.so")
    assert _toolchain.has_cxx_runtime(str(so)) is True
    probe = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "try:\n"
        "    torch.ops.memit_fast.cholesky(torch.zeros(3, 4, dtype=torch.float64), 'fp64', 0, True)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(so)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "A must be square, got shape [3, 4]" in run.stdout
