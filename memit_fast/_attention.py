"""The attention backends of the engine's own forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """cuDNN attention switched off for the duration, every other attention flag as the
    caller left it.

    cuDNN attention builds an execution graph for every new input shape, and the statistics
    pass, the target phase and the evaluation see hundreds of shapes. On an H100 (torch 2.11)
    the statistics pass of gpt2-xl over 1,000 texts took 5.02 s under torch's default choice
    and 1.25 s without cuDNN attention, each in a process of its own
    (``benchmarks/results/gpu_h100.md``). Only cuDNN's flag changes, and it is restored on
    exit. The flags are torch's global ones, so other threads see the change meanwhile. A
    caller who left no other CUDA backend enabled (flash, memory-efficient or math) keeps
    cuDNN attention. On the CPU the flag changes nothing."""
    cuda = torch.backends.cuda
    others = cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled() or cuda.math_sdp_enabled()
    if not (cuda.cudnn_sdp_enabled() and others):
        yield
        return
    cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        cuda.enable_cudnn_sdp(True)
