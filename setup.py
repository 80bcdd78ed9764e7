"""Build script: the Python package, the Triton kernels (as ``memit_fast.kernels``) and,
optionally, the C++/CUDA extension ``memit_fast._C``.

The extension's CPU kernels are built wherever a C++ compiler is found; its CUDA kernels
are added when the installed torch is a CUDA build and nvcc is found. Environment knobs:

  MEMIT_FAST_NO_EXT=1        pure-Python install (no extension; the torch references serve)
  MEMIT_FAST_NO_CUDA=1       build the CPU kernels only, even where CUDA is available
  MEMIT_FAST_CUDA_ARCH=9.0   CUDA architectures (else TORCH_CUDA_ARCH_LIST, else torch's
                             choice for the GPUs it sees), e.g. "8.0;9.0"
  MAX_JOBS=N                 parallel compile jobs (read by torch's ninja build)
  CXX / CC                   the compilers; one that links libstdc++ statically (some
                             wrappers do) is replaced by the first of g++/c++/clang++ that
                             links it as libtorch does, with one line saying so
                             (memit_fast/_toolchain.py)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig

from setuptools import setup

PACKAGES = ["memit_fast", "memit_fast.testing", "memit_fast.kernels"]
PACKAGE_DIR = {"memit_fast.kernels": "kernels"}
CSRC = os.path.join("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _fail(message: str) -> None:
    sys.stderr.write(
        f"memit_fast: cannot build the extension memit_fast._C: {message}. "
        "Install the missing tool, or set MEMIT_FAST_NO_EXT=1 for a pure-Python install.\n"
    )
    raise SystemExit(1)


def _toolchain():
    """``memit_fast/_toolchain.py``, loaded by path: the package itself needs torch."""
    spec = importlib.util.spec_from_file_location(
        "memit_fast_toolchain",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "memit_fast", "_toolchain.py"),
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _use_shared_cxx_runtime(cxx: str) -> None:
    """Build with a compiler that links the shared libstdc++, as libtorch is linked: a
    compiler (wrapper) that links it statically gives an extension that crashes at its
    first C++ error. Replaces ``CXX`` and ``CC`` for this build where needed, with one
    line saying so."""
    try:
        new_cxx, cc, why = _toolchain().pick_compiler(cxx)
    except RuntimeError as e:
        _fail(str(e))
    if why:
        sys.stderr.write(f"memit_fast: {why}.\n")
        os.environ["CXX"] = new_cxx
        if cc:
            os.environ["CC"] = cc


def ext_modules_and_cmdclass():
    if _flag("MEMIT_FAST_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _fail(
            "torch is not importable in the build environment (pip install torch first, "
            "then install with --no-build-isolation)"
        )
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        _fail(f"no C++ compiler found (looked for {cxx.split()[0]!r})")
    _use_shared_cxx_runtime(cxx)

    sources = [os.path.join(CSRC, "linalg.cpp"), os.path.join(CSRC, "ops.cpp")]
    define = [
        ("MEMIT_FAST_PYTHON_MODULE", None),
        ("MEMIT_FAST_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # No -std flag: BuildExtension then adds the C++ standard of the torch it builds against
    # (C++17 for torch 2.11, C++20 for 2.13), so that the torch headers' inline code is
    # compiled here as it was in libtorch.
    cxx_flags = ["-O3"]
    with_cuda = not _flag("MEMIT_FAST_NO_CUDA") and torch.version.cuda is not None
    if with_cuda and cpp_extension.CUDA_HOME is None:
        sys.stderr.write(
            "memit_fast: torch is a CUDA build but nvcc was not found (set CUDA_HOME): "
            "building the CPU kernels of memit_fast._C only.\n"
        )
        with_cuda = False
    if with_cuda:
        arch = os.environ.get("MEMIT_FAST_CUDA_ARCH")
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default")
        define += [
            ("MEMIT_FAST_CUDA_VERSION", f'"{torch.version.cuda}"'),
            ("MEMIT_FAST_CUDA_ARCHS", f'"{archs}"'),
        ]
        sources.append(os.path.join(CSRC, "cuda", "ops_cuda.cu"))
        ext = cpp_extension.CUDAExtension(
            "memit_fast._C",
            sources,
            define_macros=define,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "memit_fast._C",
            sources,
            define_macros=define,
            extra_compile_args={"cxx": cxx_flags},
        )
    build_ext = cpp_extension.BuildExtension.with_options(
        use_ninja=shutil.which("ninja") is not None
    )
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={
        "memit_fast": [
            "resources/*.txt",
            "resources/*.json",
            "resources/*.md",
            "resources/*.safetensors",
            "resources/world/*",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
