"""Does a C++ error of the extension reach Python as an exception on this machine?

A ``TORCH_CHECK`` that fails inside ``memit_fast._C`` throws a ``c10::Error`` that unwinds
through the extension's frames (and c10 records a backtrace through them); with some
compiler / libgcc combinations that crashes the process instead. This script finds out,
each probe in its own process (a crash is a result, not the end of the run):

1. the built ``memit_fast._C``: one bad call per op (``cholesky`` of a non-square matrix,
   ``cholesky_update`` with a wrong row count), under the default environment;
2. a tiny extension with one ``TORCH_CHECK``, built by ``torch.utils.cpp_extension.load``
   with each of several compilers / flags (``--variants``), in parallel: which build
   settings survive a throw.

    python benchmarks/check_ext_exceptions.py            # prints one line per probe

Exit status 0 when the built extension's errors arrive as Python exceptions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE_BUILT = textwrap.dedent(
    """
    import torch
    from memit_fast import _ext
    assert _ext.load() is not None, "memit_fast._C did not load"
    calls = {
        "cholesky non-square": lambda: torch.ops.memit_fast.cholesky(torch.ones(3, 4)),
        "cholesky_update rows": lambda: torch.ops.memit_fast.cholesky_update(
            torch.eye(7), torch.ones(6, 2)),
    }
    for name, fn in calls.items():
        try:
            fn()
        except RuntimeError as e:
            print(f"{name}: RuntimeError: {str(e).splitlines()[0][:120]}", flush=True)
        else:
            print(f"{name}: no error raised", flush=True)
    """
)

TINY_SOURCE = textwrap.dedent(
    """
    #include <ATen/ATen.h>
    #include <torch/library.h>

    at::Tensor must_be_square(const at::Tensor& A) {
      TORCH_CHECK(A.size(0) == A.size(1), "must_be_square: got shape ", A.sizes());
      return A;
    }

    TORCH_LIBRARY(NAME, m) { m.def("must_be_square(Tensor A) -> Tensor"); }
    TORCH_LIBRARY_IMPL(NAME, CPU, m) { m.impl("must_be_square", &must_be_square); }
    """
)

PROBE_TINY = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.cpp_extension import load
    name, src, build, cflags, ldflags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    load(name=name, sources=[src], build_directory=build, is_python_module=False,
         extra_cflags=cflags.split(), extra_ldflags=ldflags.split(), verbose=False)
    try:
        getattr(torch.ops, name).must_be_square(torch.ones(3, 4))
    except RuntimeError as e:
        print("RuntimeError:", str(e).splitlines()[0][:80], flush=True)
    """
)

# name -> (CXX, extra cflags, extra ldflags); a CXX that does not exist is skipped.
# "as_built" mirrors setup.py under setuptools (Python's CFLAGS and LDSHARED flags, then ours).
_PY = "-fno-strict-overflow -DNDEBUG -g -O2 -Wall"
VARIANTS = {
    "as_built": ("", f"{_PY} -O3 -std=c++20", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    "no_bsymbolic": ("", f"{_PY} -O3 -std=c++20", "-Wl,-O1"),
    "no_debug_info": ("", "-O3 -std=c++20", ""),
    "dwarf4": ("", f"{_PY} -O3 -std=c++20 -gdwarf-4", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    "static_libgcc": ("", f"{_PY} -O3 -std=c++20", "-static-libgcc"),
    "usr_bin_gxx": ("/usr/bin/g++", f"{_PY} -O3 -std=c++20", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    # The compiler wrapper that built the extension on the lent GPU machine's image.
    "opt_gcc_wrapper": (
        "/opt/gcc/bin/g++",
        f"{_PY} -O3 -std=c++20",
        "-Wl,-O1 -Wl,-Bsymbolic-functions",
    ),
    # Whatever CXX the environment names (what setuptools and ninja use), if set.
    "env_cxx": (os.environ.get("CXX", ""), f"{_PY} -O3 -std=c++20", "-Wl,-O1"),
}


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """One probe process, started (it is awaited with the others)."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )


def describe(rc: int, out: str) -> str:
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    state = "ok" if rc == 0 else (f"CRASH (signal {-rc})" if rc < 0 else f"exit {rc}")
    return f"{state}: " + " | ".join(last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for tool in ("c++", "g++", "/usr/bin/g++", "/opt/gcc/bin/g++"):
        path = shutil.which(tool)
        if path:
            ver = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            print(f"compiler {tool}: {path}: {ver.splitlines()[0] if ver else '?'}")
    import sysconfig

    import torch

    print(f"python CXX: {sysconfig.get_config_var('CXX')}; torch {torch.__version__}")
    for line in torch.__config__.show().splitlines():
        for key in ("GCC", "clang", "C++ Version", "CXX_COMPILER"):
            i = line.find(key)
            if i >= 0:
                print("torch built with:", line[i : i + 60].split(",")[0].strip())

    procs = {"built _C": start([sys.executable, "-c", PROBE_BUILT], env)}
    work = tempfile.mkdtemp(prefix="ext_throw_")
    for name in args.variants.split(","):
        cxx, cflags, ldflags = VARIANTS[name]
        if name == "env_cxx" and not cxx:
            print("tiny env_cxx: skipped (CXX is not set)")
            continue
        if cxx and not shutil.which(cxx):
            print(f"tiny {name}: skipped ({cxx} not found)")
            continue
        lib = f"throwcheck_{name}"
        src = os.path.join(work, f"{lib}.cpp")
        with open(src, "w") as f:
            f.write(TINY_SOURCE.replace("NAME", lib))
        build = os.path.join(work, lib)
        os.makedirs(build)
        venv = (
            dict(env, CXX=cxx) if cxx else dict(env, CXX=sysconfig.get_config_var("CXX") or "c++")
        )
        procs[f"tiny {name}"] = start(
            [sys.executable, "-c", PROBE_TINY, lib, src, build, cflags, ldflags], venv
        )
    built_ok = False
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            print(f"{name}: timed out | {out.strip()[-200:]}")
            continue
        print(f"{name}: {describe(p.returncode, out)}")
        if name == "built _C":
            built_ok = p.returncode == 0 and "no error raised" not in out
    return 0 if built_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
