"""What a launcher hands to Triton, as data: kernel, grid, arguments, block configuration.

Each op file turns its inputs into a list of ``Launch`` objects (its *plan*) and then runs
them. The ahead-of-time build (``aot.py``) compiles the same plans for a ``GPUTarget``
instead, so the block configurations that CI compiles are the ones the launchers use: the
config tables in the op files are the single source of truth for both.

No Triton import at load time: imported by the AOT helper and the launchers only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and schedule of one GEMM-like kernel.

    ``block_m x block_n`` output tile, ``block_k`` reduction step, ``group`` tile rows
    walked together for L2 reuse, plus Triton's ``num_warps`` / ``num_stages``.
    """

    block_m: int
    block_n: int
    block_k: int
    group: int
    num_warps: int
    num_stages: int


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=.., num_stages=..)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def run(self) -> None:
        if min(self.grid) == 0:
            return
        # Triton launches on the current CUDA device and its stream: make that the device
        # of the tensors (a model on cuda:1, or split over devices).
        dev = next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else None
        with guard if guard is not None else contextlib.nullcontext():
            self.kernel[self.grid](
                *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
            )


def arch_of(device: torch.device) -> int:
    """The config family for ``device``: 90 for Hopper/Blackwell datacenter parts (about
    228 KiB shared memory per SM, ``wgmma``), 80 for every other sm_80+ part (configs fit
    in the 99 KiB of the consumer chips). CPU tensors (the Triton interpreter) get 90."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def fp32_dot_precision(device: torch.device, requested: str | None = None) -> str:
    """``tl.dot`` input precision for fp32 operands that may use the tensor cores:
    ``requested`` where one is given, except on the CPU.

    On the GPU (and for ahead-of-time builds, planned on ``meta`` tensors) this is
    ``bf16x6``: each fp32 operand is split into three bf16 parts and the six products that
    matter are accumulated in fp32, so each product is good to about fp32 rounding (single
    pass TF32 keeps 11 bits; the 3-pass TF32 split about 21). Six bf16 MMAs cost what three
    TF32 ones do. The interpreter (CPU tensors) knows no ``bf16x6`` and computes every dot in
    IEEE fp32 anyway: ``ieee`` there.
    """
    if device.type == "cpu":
        return "ieee"
    if requested is not None:
        return requested
    return "bf16x6" if "bf16x6" in _cuda_dot_precisions() else "tf32x3"


def _cuda_dot_precisions() -> tuple[str, ...]:
    """The ``tl.dot`` input precisions the installed Triton's CUDA backend accepts (older
    releases lack ``bf16x6``; ``tf32x3``, the 3-pass TF32 split, is then the closest)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return ("bf16x6",)
    return tuple(CUDAOptions.__dataclass_fields__["allowed_dot_input_precisions"].default)


def torch_to_triton_dtype(dtype: torch.dtype) -> str:
    """Triton's name for a tensor element type, as in a kernel signature (``fp32``, ...)."""
    names = {
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float64: "fp64",
        torch.uint8: "u8",
        torch.bool: "u1",
        torch.int32: "i32",
        torch.int64: "i64",
    }
    if dtype not in names:
        raise TypeError(f"no Triton element type for {dtype}")
    return names[dtype]
