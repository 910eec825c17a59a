"""Device and dtype choice, and the CPU process settings every model is built under.

Training: bf16 on a GPU, fp32 on CPU. Scoring (``pick_inference_dtype``): bf16 on a GPU and on CPUs
with AMX-BF16 tiles (Intel Sapphire Rapids and later), fp32 on other CPUs. Measured on a 2-core
AMX Xeon (``benchmarks/bench_attention.py``, ``bench_onnx.py``; README "Speed", "bf16 on AMX CPUs"):
a bf16 GEMM of the model's MLP shape runs ~8x a fp32 one, scoring 2.4-3.5x, the ranking kept; on
the earlier AVX2 machine (no AMX) bf16 was ~3x *slower* than fp32. A training step gains
1.4-1.5x on AMX (``benchmarks/bench_train_dtype.py``: its non-GEMM work and the casts dominate), so
training stays fp32 on every CPU by default, machine-independent; ``bf16_autocast: true`` in a
training section opts in (fp32 weights, bf16 GEMMs; ``training/trainer.py``).

Process settings, made once where a model or teacher is built: ``warm_cpu_math`` (oneMKL's first-call
race) and ``keep_freed_memory`` (glibc's malloc reuses freed activations instead of page-faulting them
in again).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

CPU_MALLOC_ENV = "MATRYOSHKA_CPU_MALLOC"  # "0"/"false"/"off"/"no": leave glibc's allocator as it is
CPU_BF16_ENV = "MATRYOSHKA_CPU_BF16"  # "0"/"false"/"off"/"no": score in fp32 on AMX CPUs too (parity with fp32 exports)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The float unary ops ATen hands to oneMKL's vector math library (VML; ``ATen/cpu/vml.h``).
_VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
            "tan", "tanh", "trunc")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True when this CPU runs bf16 matmuls on AMX tiles (oneDNN's fast bf16 path): the ``amx_bf16``
    capability, oneDNN present, and the kernel granting AMX state to this process."""
    try:
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("amx_bf16") and torch.backends.mkldnn.is_available() and torch.cpu._init_amx())
    except (AttributeError, RuntimeError):  # an older/newer torch without these helpers: assume no AMX
        return False


@functools.cache
def warm_cpu_math() -> None:
    """Calls each VML-backed op once on one element, so oneMKL picks its kernels before any threaded call.

    oneMKL chooses a VML function's kernel on that function's first call. When the first call is split
    over intra-op threads (tensors over 2,048 elements), one thread can run a low-accuracy kernel for
    its chunk of that one call, although full accuracy is requested (pytorch/pytorch#188792; oneMKL
    2024.2, as in the torch 2.13 wheels). Seen here: the rotary embedding's ``cos`` over an 85-token
    batch came out up to 1.5e-4 wrong on positions 1-42 in about 1 process in 40, moving that batch's
    scores by up to 0.006 and failing ``export``'s parity check (docs/timings.md). A one-element call
    runs on the calling thread alone, so it settles the choice; it costs microseconds. Called where a
    model is built (``MatryoshkaModel``, the teachers), once per process.
    """
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in _VML_OPS:
            getattr(torch, name)(x)


_OFF = ("0", "false", "off", "no")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
_KEEP_BYTES = (1 << 30, 32 << 20)  # tried in turn: glibc before 2.35 refuses thresholds over 32 MiB


@functools.cache
def keep_freed_memory() -> bool:
    """Lets glibc's malloc reuse freed tensor memory instead of handing it back to the kernel; True when set.

    A forward pass allocates and frees activations of megabytes per op (16 pairs x 214 tokens: a (3424, 1536)
    fp32 MLP activation is 21 MB). glibc serves blocks that large with ``mmap`` and unmaps them on ``free`` (or
    trims the heap top), so every op's output is fresh memory, page-faulted in 4 KiB at a time and zeroed by the
    kernel. Measured here: 17,000-20,000 page faults per fp32 decoder layer call, and 0 to 1.26 million per 64
    pairs scored, depending on what the process ran before. Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` keeps freed blocks in the process for the next op, which is what jemalloc / tcmalloc
    (Intel's advice for PyTorch on CPU) give through ``LD_PRELOAD``, done here from inside the process. Measured
    on the 2-core AMX Xeon (``benchmarks/bench_allocator.py``, ``docs/results/allocator/``; README "Speed",
    "Memory"): one fp32 decoder layer 143 -> 115-121 ms; side by side, fp32 ``compute_score`` 1.02-1.25x and
    bf16 0.98-1.07x depending on the process's history, a training step 1.02-1.04x; resident memory of a scoring
    loop up to 10% higher. The cost: memory freed after a peak stays with the process (reused, not returned),
    per malloc arena (threads other than the main one get their own, whose blocks over 64 MiB are still
    mmapped). Glibc before 2.35 refuses thresholds over 32 MiB (64-bit builds), so there the 32 MiB fallback
    applies. Off with ``MATRYOSHKA_CPU_MALLOC=0`` (read on the first call); a no-op off glibc (musl, macOS,
    Windows), and without effect under an ``LD_PRELOAD``-ed jemalloc / tcmalloc (which need no help). Called
    where a model or teacher is built (``MatryoshkaModel``, ``training/teacher.py``), once per process.
    """
    if os.environ.get(CPU_MALLOC_ENV, "1").strip().lower() in _OFF or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt is a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for size in _KEEP_BYTES:
        if mallopt(_M_MMAP_THRESHOLD, size) == 1:
            return mallopt(_M_TRIM_THRESHOLD, size) == 1
    return False


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The training dtype. ``None``/"auto": bfloat16 on CUDA (where supported), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 is not supported on CPU; use float32 (or bfloat16)")
    return _DTYPES[dtype]


def pick_inference_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The scoring dtype. ``None``/"auto": as ``pick_dtype``, and bfloat16 on a CPU with AMX-BF16
    unless ``MATRYOSHKA_CPU_BF16=0``."""
    if (dtype in (None, "auto") and device.type == "cpu"
            and os.environ.get(CPU_BF16_ENV, "1").strip().lower() not in _OFF and cpu_has_amx_bf16()):
        return torch.bfloat16
    return pick_dtype(dtype, device)
