"""Choices that depend on the machine: numeric precision, and how host memory is reused."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), as Linux reports."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# bf16 maths in hardware (tensor cores, cuDNN's bf16 kernels) starts with Ampere.
NATIVE_BF16_CAPABILITY = (8, 0)


def uses_cuda(accelerator: str = "auto") -> bool:
    """Whether a run with Lightning's `accelerator` trains on a CUDA GPU."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning `precision` for `accelerator`: bf16-mixed where the hardware has bf16 maths
    (Ampere and newer GPUs, CPUs with AVX512-BF16/AMX), 16-mixed on older GPUs such as the T4,
    32-true otherwise. On this project's CPU bf16-mixed measured faster at equal accuracy
    (see the README's performance section).

    Not `torch.cuda.is_bf16_supported()`: by default it counts emulation, so it says True on a
    T4 (compute capability 7.5), whose bf16 convolutions then leave cuDNN for slow fallbacks.
    """
    if uses_cuda(accelerator):
        native = torch.cuda.get_device_capability() >= NATIVE_BF16_CAPABILITY
        return "bf16-mixed" if native else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def free_device_memory(device: torch.device) -> int:
    """Bytes a new tensor can take on CUDA `device`: the driver's free memory plus what PyTorch's
    caching allocator holds reserved but unused (the driver counts that as used, so after a fit,
    or in the next trial of a search, `mem_get_info` alone under-counts)."""
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of `device` (a no-op off CUDA), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(limit: int = 2**30) -> bool:
    """Have glibc's malloc keep freed blocks of up to `limit` bytes for reuse; True if it did.

    Every CPU training step allocates and frees the same large tensors (the first block's
    activations are 82 MB at batch 16, 200x200). glibc serves such blocks with fresh pages from
    the kernel and returns them on free, so each step page-faults about 260 MB back in (67,000
    faults, 0.17 s of kernel time per step of smallcnn here, ~20% of the step). Kept, they are
    reused at no cost. The process's memory then stays at its peak instead of shrinking between
    steps. Only glibc (Linux) has these settings; elsewhere nothing changes.
    """
    if platform.libc_ver()[0] != "glibc" or not (name := ctypes.util.find_library("c")):
        return False
    libc = ctypes.CDLL(name)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, limit))
