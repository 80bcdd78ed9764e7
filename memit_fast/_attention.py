"""The attention backends of the engine's own forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """The attention backends the caller has enabled, less cuDNN attention, for the duration.

    cuDNN attention builds an execution graph for every new input shape, and the statistics
    pass, the target phase and the evaluation see hundreds of shapes. On an H100 (torch 2.11)
    the statistics pass of gpt2-xl over 1,000 texts took 5.02 s under torch's default choice
    and 1.25 s without cuDNN attention, each in a process of its own
    (``benchmarks/results/gpu_h100.md``). The flags are torch's global ones (they also hold
    for other threads meanwhile) and are restored on exit; a caller who enabled only cuDNN
    attention keeps it. On the CPU the flags change nothing."""
    cuda = torch.backends.cuda
    if not cuda.cudnn_sdp_enabled():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kept = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, cuda.math_sdp_enabled()),
        )
        if enabled
    ]
    if not kept:
        yield
        return
    with sdpa_kernel(kept):
        yield
