"""Guarded loading of the compiled extension ``memit_fast._C``.

``load()`` imports it on first use (never at ``import memit_fast``) and returns the module,
or ``None`` with one warning that names what the extension was built for and what was
found, after which the torch references in ``memit_fast.linalg`` serve every call.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import warnings
from types import ModuleType

import torch

from memit_fast import _toolchain

log = logging.getLogger(__name__)

OPS = ("cholesky", "cholesky_update", "cholesky_solve")


def _found() -> str:
    cuda = torch.version.cuda or "none"
    return f"torch={torch.__version__} cuda={cuda}"


def _built_for() -> str:
    """The build line embedded in the library file, read without loading it."""
    spec = importlib.util.find_spec("memit_fast._C")
    if spec is None or not spec.origin:
        return "unknown"
    with open(spec.origin, "rb") as f:
        m = re.search(rb"memit_fast\._C build: ([ -~]+)", f.read())
    return m.group(1).decode() if m else "unknown"


def _import() -> ModuleType:
    from memit_fast import _C

    return _C


@functools.cache
def load() -> ModuleType | None:
    """The extension module with its ops registered as ``torch.ops.memit_fast.*``, or
    ``None`` (one warning) when it is missing, fails to load or was built for another
    torch."""
    spec = importlib.util.find_spec("memit_fast._C")
    if spec is None:
        log.info("memit_fast._C is not built; using the torch references")
        return None
    if spec.origin and _toolchain.has_cxx_runtime(spec.origin) is False:
        # Checked before loading: such a build crashes at its first C++ error.
        warnings.warn(
            f"memit_fast._C (built for {_built_for()}) carries its own copy of libstdc++ "
            "(linked with -static-libstdc++): a C++ error inside it would crash the process "
            "instead of raising. Rebuild with `pip install --no-build-isolation -e .` (setup.py "
            "picks a compiler that links the shared one); using the torch references.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        _C = _import()
    except ImportError as e:
        warnings.warn(
            f"memit_fast._C (built for {_built_for()}) failed to load ({e}); found {_found()}. "
            "Rebuild with `pip install --no-build-isolation -e .`; using the torch references.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    built = torch.ops.memit_fast.build_info()
    built_torch = built.split()[0].removeprefix("torch=")
    if built_torch.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"memit_fast._C was built for {built} but found {_found()}. "
            "Rebuild with `pip install --no-build-isolation -e .`; using the torch references.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _check_cxx_standard(built)
    log.info("memit_fast._C loaded (%s)", built)
    return _C


def _torch_cxx_standard() -> str | None:
    """``__cplusplus`` of the torch build (``torch.__config__.show()``), if it says."""
    m = re.search(r"C\+\+ Version: (\d+)", torch.__config__.show())
    return m.group(1) if m else None


def _check_cxx_standard(built: str) -> None:
    """One warning when the extension was compiled under another C++ standard than
    libtorch: the torch headers' inline code then differs between the two, and a C++ error
    raised inside the extension may end the process instead of raising."""
    m = re.search(r"\bcxx=(\d+)", built)
    theirs = _torch_cxx_standard()
    if m and theirs and m.group(1) != theirs:
        warnings.warn(
            f"memit_fast._C was compiled as C++ {m.group(1)} but torch as C++ {theirs}; an "
            "error inside the extension may crash the process instead of raising. Rebuild "
            "with `pip install --no-build-isolation -e .` (setup.py takes torch's standard).",
            RuntimeWarning,
            stacklevel=3,
        )


def build_info() -> str | None:
    """What the loaded extension was built for, or ``None`` without one."""
    return torch.ops.memit_fast.build_info() if load() is not None else None


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether the extension is loaded and registers ``op`` for ``device``'s type."""
    if load() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"memit_fast::{op}", key
    )
