"""Helpers shared by the kernel tests: one comparison that says where it failed, an error
budget relative to plain PyTorch, and a guard against the interpreter's BLAS threads."""

from __future__ import annotations

import ctypes

import torch


def assert_verbose_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_print: int = 5,
    extra_info: str = "",
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    NaN or inf in ``actual`` is a failure wherever it is (so is a shape mismatch); the
    message lists the first ``max_print`` offending indices with both values.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{extra_info}shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(a) | ~((a - e).abs() <= atol + rtol * e.abs())
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    idx = bad.nonzero()[:max_print]
    lines = [
        f"{extra_info}{n_bad} of {a.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"non-finite in actual: {int((~torch.isfinite(a)).sum())}; first ones:"
    ]
    for i in idx.tolist():
        i = tuple(i)
        lines.append(f"  at {i}: actual {a[i].item()!r}, expected {e[i].item()!r}")
    raise AssertionError("\n".join(lines))


def assert_error_within(
    actual: torch.Tensor,
    exact: torch.Tensor,
    baseline: torch.Tensor,
    factor: float = 4.0,
    floor: float = 0.0,
    extra_info: str = "",
) -> None:
    """The fast path's max error against the float64 ``exact`` result is at most ``factor``
    times the error of plain PyTorch at the same precision (``baseline``), or ``floor``."""
    err = (actual.to(torch.float64) - exact).abs().max().item() if actual.numel() else 0.0
    base = (baseline.to(torch.float64) - exact).abs().max().item() if actual.numel() else 0.0
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{extra_info}non-finite values in the result")
    if err > max(factor * base, floor):
        raise AssertionError(
            f"{extra_info}max error {err:.3e} vs float64 exceeds {factor:g} x the torch "
            f"baseline's {base:.3e} (floor {floor:.3e})"
        )


def limit_blas_threads(n: int = 1) -> bool:
    """Set the thread count of the OpenBLAS that NumPy loaded (the Triton interpreter runs
    ``tl.dot`` as ``np.matmul``). On a 2-core machine its threads fight torch's and tiny
    matmuls take 10x longer. Returns whether a setter was found."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "openblas" in parts[5].lower():
                    libs.add(parts[5])
    except OSError:
        return False
    found = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            setter = getattr(lib, sym, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                found = True
                break
    return found


def fill_guarded(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    fill: torch.Tensor,
    device: torch.device | str = "cpu",
    pad: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A contiguous copy of ``fill`` (``shape``, ``dtype``, on ``device``) inside a flat
    buffer with ``pad`` NaN guard elements on each side: ``(tensor, buffer, pad)``. After a kernel ran on ``tensor``, the guards
    show whether it wrote out of bounds (they must still be NaN)."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype, device=device)
    t = buf[pad : pad + numel].view(shape)
    t.copy_(fill)
    return t, buf, pad


def assert_guards_intact(buf: torch.Tensor, pad: int) -> None:
    head, tail = buf[:pad], buf[buf.numel() - pad :]
    if not (torch.isnan(head).all() and torch.isnan(tail).all()):
        raise AssertionError("kernel wrote outside its output tensor (guard elements changed)")


def spy_calls(monkeypatch, targets) -> list[str]:
    """Replace each ``(module, name)`` of ``targets`` by a wrapper that records ``name`` and
    still calls the original; returns the list of recorded names, in call order."""
    seen: list[str] = []
    for mod, name in targets:
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    return seen
