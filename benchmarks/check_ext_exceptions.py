"""Does a C++ error of the extension reach Python as an exception on this machine?

A ``TORCH_CHECK`` that fails inside ``memit_fast._C`` throws a ``c10::Error`` that unwinds
through the extension's frames (and c10 records a backtrace through them); with some
compiler / libgcc combinations that crashes the process instead. This script finds out,
each probe in its own process (a crash is a result, not the end of the run):

1. the built ``memit_fast._C``: one bad call per op (``cholesky`` of a non-square matrix,
   ``cholesky_update`` with a wrong row count), under the default environment; it prints
   ``loaded`` first, so a crash on load and a crash on the throw are told apart. If it
   crashes, it is run again under ``gdb`` (where installed) or with a preloaded ``SIGSEGV``
   handler that prints the native backtrace (``backtrace_symbols_fd``);
2. the extension's own sources built again by ``torch.utils.cpp_extension.load``, once
   without and (with CUDA torch and nvcc) once with the nvcc-compiled ``.cu``: whether the
   crash follows the sources, the nvcc object, or the way the wheel was built;
3. a tiny extension with one ``TORCH_CHECK``, built with each of several compilers / flags
   (``--variants``), in parallel: which build settings survive a throw.

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

BAD_CALLS = textwrap.dedent(
    """
    calls = {
        "cholesky non-square": lambda: torch.ops.memit_fast.cholesky(torch.ones(3, 4)),
        "cholesky_update rows": lambda: torch.ops.memit_fast.cholesky_update(
            torch.eye(7), torch.ones(6, 2)),
    }
    for name, fn in calls.items():
        print(f"{name}: calling", flush=True)
        try:
            fn()
        except (RuntimeError, ValueError) as e:
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        else:
            print(f"{name}: no error raised", flush=True)
    """
)

PROBE_BUILT = (
    textwrap.dedent(
        """
        import torch
        from memit_fast import _ext
        assert _ext.load() is not None, "memit_fast._C did not load"
        print("loaded:", torch.ops.memit_fast.build_info(), flush=True)
        """
    )
    + BAD_CALLS
)

# The extension's sources, built by cpp_extension.load (argv: build dir, cflags, sources...).
PROBE_SOURCES = (
    textwrap.dedent(
        """
        import sys, torch
        from torch.utils.cpp_extension import load
        build, cflags, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
        load(name="memit_fast_probe", sources=sources, build_directory=build,
             is_python_module=False, extra_cflags=cflags.split(),
             extra_cuda_cflags=["-O3", "-std=c++20"], verbose=False)
        print("loaded", flush=True)
        """
    )
    + BAD_CALLS
)

# Preloaded into a re-run of a crashed probe: prints the native frames at the fatal signal.
SEGV_TRACE_C = textwrap.dedent(
    """
    #include <execinfo.h>
    #include <signal.h>
    #include <string.h>
    #include <unistd.h>

    static void on_fatal(int sig) {
      void* frames[64];
      int n = backtrace(frames, 64);
      static const char msg[] = "native backtrace at the fatal signal:\\n";
      write(2, msg, sizeof msg - 1);
      backtrace_symbols_fd(frames, n, 2);
      raise(sig); /* SA_RESETHAND: the default action now */
    }

    __attribute__((constructor)) static void install(void) {
      void* f[1];
      backtrace(f, 1); /* loads libgcc_s now, not inside the handler */
      struct sigaction sa;
      memset(&sa, 0, sizeof sa);
      sa.sa_handler = on_fatal;
      sa.sa_flags = SA_RESETHAND;
      sigaction(SIGSEGV, &sa, 0);
      sigaction(SIGBUS, &sa, 0);
      sigaction(SIGABRT, &sa, 0);
    }
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
# "as_built" mirrors setup.py under setuptools (Python's CFLAGS and LDSHARED flags, then ours;
# no -std flag, so torch's own standard); "cxx20" is the build before that, which forced
# C++20 whatever the standard of libtorch.
_PY = "-fno-strict-overflow -DNDEBUG -g -O2 -Wall"
VARIANTS = {
    "as_built": ("", f"{_PY} -O3", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    "cxx20": ("", f"{_PY} -O3 -std=c++20", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    "no_bsymbolic": ("", f"{_PY} -O3", "-Wl,-O1"),
    "no_debug_info": ("", "-O3", ""),
    "dwarf4": ("", f"{_PY} -O3 -gdwarf-4", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    "static_libgcc": ("", f"{_PY} -O3", "-static-libgcc"),
    "usr_bin_gxx": ("/usr/bin/g++", f"{_PY} -O3", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    # The compiler wrapper that built the extension on the lent GPU machine's image.
    "opt_gcc_wrapper": ("/opt/gcc/bin/g++", f"{_PY} -O3", "-Wl,-O1 -Wl,-Bsymbolic-functions"),
    # Whatever CXX the environment names (what setuptools and ninja use), if set.
    "env_cxx": (os.environ.get("CXX", ""), f"{_PY} -O3", "-Wl,-O1"),
}
# The extension's own sources, built as setup.py builds them now and as it did before.
SOURCE_FLAGS = {"": VARIANTS["as_built"][1], " c++20": VARIANTS["cxx20"][1]}


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """One probe process, started (it is awaited with the others)."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """``proc``'s output and whether it ended within ``timeout`` seconds (else killed)."""
    try:
        return proc.communicate(timeout=timeout)[0], True
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0], False


def describe(rc: int, out: str) -> str:
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    state = "ok" if rc == 0 else (f"CRASH (signal {-rc})" if rc < 0 else f"exit {rc}")
    return f"{state}: " + " | ".join(last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument(
        "--all", action="store_true", help="run every probe even when the built _C raises"
    )
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

    built_cmd = [sys.executable, "-c", PROBE_BUILT]
    proc = start(built_cmd, env)
    out, ended = finish(proc, args.timeout)
    if not ended:
        print(f"built _C: no answer in {args.timeout} s (hung?)\n{out[-2000:]}")
        return 1
    print(f"built _C: {describe(proc.returncode, out)}")
    built_ok = proc.returncode == 0 and "no error raised" not in out
    if built_ok and not args.all:
        return 0
    work = tempfile.mkdtemp(prefix="ext_throw_")
    if proc.returncode < 0:
        print(native_backtrace(built_cmd, env, work))

    # Bisect: the same sources rebuilt here (with and without the nvcc object, with torch's
    # C++ standard and with C++20), and a tiny extension under each build setting.
    procs: dict[str, subprocess.Popen] = {}
    csrc = os.path.join(REPO, "csrc")
    cpp = [os.path.join(csrc, "linalg.cpp"), os.path.join(csrc, "ops.cpp")]
    source_sets = {"sources cpu-only": cpp}
    if torch.version.cuda and shutil.which("nvcc"):
        # The .cu first: the object order of the real build.
        source_sets["sources with .cu"] = [os.path.join(csrc, "cuda", "ops_cuda.cu")] + cpp
    else:
        print("sources with .cu: skipped (no CUDA torch or no nvcc)")
    for name, sources in source_sets.items():
        for suffix, cflags in SOURCE_FLAGS.items():
            build = os.path.join(work, (name + suffix).replace(" ", "_").replace(".", ""))
            os.makedirs(build)
            cmd = [sys.executable, "-c", PROBE_SOURCES, build, cflags, *sources]
            procs[name + suffix] = start(cmd, env)
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
    for name, p in procs.items():
        out, ended = finish(p, args.timeout)
        if not ended:
            print(f"{name}: timed out | {out.strip()[-200:]}")
            continue
        print(f"{name}: {describe(p.returncode, out)}")
    return 0 if built_ok else 1


def native_backtrace(cmd: list[str], env: dict[str, str], work: str, keep: int = 40) -> str:
    """The native stack of ``cmd``'s crash: under ``gdb`` where installed, else with
    ``SEGV_TRACE_C`` preloaded (compiled here by ``cc``). The last ``keep`` lines."""
    gdb = shutil.which("gdb")
    if gdb:
        run = [gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 30", "--args", *cmd]
        how = "gdb"
    else:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return "native backtrace: no gdb and no C compiler"
        src, lib = os.path.join(work, "segv_trace.c"), os.path.join(work, "segv_trace.so")
        with open(src, "w") as f:
            f.write(SEGV_TRACE_C)
        made = subprocess.run([cc, "-shared", "-fPIC", "-O1", src, "-o", lib], capture_output=True)
        if made.returncode != 0:
            return f"native backtrace: building the handler failed: {made.stderr[-300:]!r}"
        env = dict(env, LD_PRELOAD=lib)
        run, how = cmd, "preloaded SIGSEGV handler"
    try:
        proc = subprocess.run(run, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"native backtrace ({how}): timed out"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # From the innermost frame on (gdb's "#0", the handler's header), else the tail.
    first = next(
        (i for i, ln in enumerate(lines) if ln.startswith(("#0 ", "native backtrace at"))),
        max(len(lines) - keep, 0),
    )
    return f"native backtrace ({how}, exit {proc.returncode}):\n" + "\n".join(
        lines[first : first + keep]
    )


if __name__ == "__main__":
    raise SystemExit(main())
