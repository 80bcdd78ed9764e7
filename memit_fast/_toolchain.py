"""How the C++ runtime reaches the extension ``memit_fast._C`` (standard library only:
``setup.py`` loads this file before anything of the package can be imported).

A C++ error raised inside the extension is a ``c10::Error`` built with the stream classes
of libstdc++ and caught by libtorch. Both must use the one shared libstdc++ of the
process: an extension linked with its own copy (``-static-libstdc++``, which some
compiler wrappers add to every link) crashes with SIGSEGV at its first ``TORCH_CHECK``
instead of raising. Measured on an H200 machine whose ``CXX`` was such a wrapper
(``benchmarks/results/gpu_h200.md``): the same sources built by the system ``g++`` raise.

``needed()`` reads an ELF shared object's ``DT_NEEDED`` entries without loading it;
``links_cxx_runtime_dynamically()`` links a tiny shared object with a compiler and reads
them; ``pick_compiler()`` is what ``setup.py`` uses.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5

_PROBE_SOURCE = """
#include <sstream>
#include <stdexcept>
#include <string>
std::string memit_fast_probe(long v) {
  std::ostringstream s;
  s << "value " << v;
  if (v < 0) throw std::runtime_error(s.str());
  return s.str();
}
"""


def needed(path: str) -> list[str] | None:
    """The ``DT_NEEDED`` libraries of an ELF file (64- or 32-bit, either byte order), or
    ``None`` where ``path`` is not ELF or has no dynamic section (a static link)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or len(data) < 52:
        return None
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        (phoff,) = struct.unpack_from(end + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
    else:
        (phoff,) = struct.unpack_from(end + "I", data, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
    loads, dynamic = [], None
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                end + "IIQQQQ", data, off
            )
        else:
            p_type, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(end + "IIIII", data, off)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None
    fmt, size = (end + "qQ", 16) if is64 else (end + "iI", 8)
    names, strtab = [], None
    for off in range(dynamic[0], dynamic[0] + dynamic[1] - size + 1, size):
        tag, val = struct.unpack_from(fmt, data, off)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            names.append(val)
        elif tag == _DT_STRTAB:
            strtab = val
    if strtab is None:
        return []
    # DT_STRTAB is an address: the load segment that holds it gives its file offset.
    base = next((o + strtab - v for v, o, s in loads if v <= strtab < v + s), None)
    if base is None:
        return None
    return [data[base + n : data.index(b"\0", base + n)].decode() for n in names]


def has_cxx_runtime(path: str) -> bool | None:
    """Whether an ELF shared object needs the shared libstdc++ (or libc++); ``None`` where
    that cannot be read (not ELF)."""
    libs = needed(path)
    if libs is None:
        return None
    return any(lib.startswith(("libstdc++.so", "libc++.so")) for lib in libs)


def links_cxx_runtime_dynamically(cxx: str) -> bool | None:
    """Whether the compiler command ``cxx`` links a shared object against the shared C++
    runtime, as libtorch is linked; ``None`` where the probe does not compile (no such
    compiler) or its output is not ELF (not Linux)."""
    argv = cxx.split()
    if not argv or shutil.which(argv[0]) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="memit_fast_cxx_") as tmp:
        src, out = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE_SOURCE)
        try:
            done = subprocess.run(
                [*argv, "-shared", "-fPIC", "-O1", src, "-o", out],
                capture_output=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0 or not os.path.exists(out):
            return None
        return has_cxx_runtime(out)


def _sibling_c_compiler(cxx: str) -> str | None:
    """The C compiler beside a C++ one (``/usr/bin/g++`` -> ``/usr/bin/gcc``)."""
    path = shutil.which(cxx)
    if path is None:
        return None
    head, name = os.path.split(path)
    for a, b in (("g++", "gcc"), ("clang++", "clang"), ("c++", "cc")):
        if name.endswith(a):
            c = os.path.join(head, name[: -len(a)] + b)
            if os.access(c, os.X_OK):
                return c
    return None


FALLBACKS = ("g++", "c++", "clang++", "/usr/bin/g++", "/usr/bin/c++")


def pick_compiler(cxx: str, fallbacks: tuple[str, ...] = FALLBACKS) -> tuple[str, str | None, str]:
    """``(cxx, cc, why)``: ``cxx`` itself where it links the C++ runtime dynamically (or
    that cannot be told: ``cc`` is then ``None`` and nothing changes), else the first of
    ``fallbacks`` that does, with its C compiler; ``why`` is empty, or says what was
    replaced and why. Raises ``RuntimeError`` where no candidate links dynamically."""
    verdict = links_cxx_runtime_dynamically(cxx)
    if verdict is not False:
        return cxx, None, ""
    bad = {os.path.realpath(shutil.which(cxx.split()[0]) or cxx)}
    for cand in fallbacks:
        path = shutil.which(cand)
        if path is None or os.path.realpath(path) in bad:
            continue
        if links_cxx_runtime_dynamically(path):
            why = (
                f"{cxx} links libstdc++ statically (an extension with its own copy crashes "
                f"at its first C++ error instead of raising); building with {path} instead"
            )
            return path, _sibling_c_compiler(path), why
        bad.add(os.path.realpath(path))
    raise RuntimeError(
        f"{cxx} links libstdc++ statically, and none of {', '.join(fallbacks)} links it "
        "dynamically; an extension built so would crash at its first C++ error. Set CXX "
        "(and CC) to a compiler that links the shared libstdc++, as libtorch does"
    )
