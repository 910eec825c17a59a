"""Device and dtype choice.

Training: bf16 on a GPU, fp32 on CPU. Scoring (``pick_inference_dtype``): bf16 on a GPU and on CPUs
with AMX-BF16 tiles (Intel Sapphire Rapids and later), fp32 on other CPUs. Measured on a 2-core
AMX Xeon (``benchmarks/bench_cpu_dtype.py``, README "Speed"): a bf16 GEMM of the model's MLP
shape runs ~6x a fp32 one, scoring ~3x, with the ranking kept; on AVX2/AVX-512 CPUs without AMX,
bf16 is ~3x *slower* than fp32. A training step gains only ~1.3x there (its non-GEMM work and the
casts dominate), so training stays fp32 on every CPU.
"""

from __future__ import annotations

import functools
import os

import torch

CPU_BF16_ENV = "MATRYOSHKA_CPU_BF16"  # "0": score in fp32 on AMX CPUs too (exact parity with fp32 exports)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True when this CPU runs bf16 matmuls on AMX tiles (oneDNN's fast bf16 path)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() and cpu._is_avx512_bf16_supported() and cpu._init_amx())
    except (AttributeError, RuntimeError):  # private helpers; an older/newer torch without them: assume no AMX
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
    if (dtype in (None, "auto") and device.type == "cpu" and os.environ.get(CPU_BF16_ENV, "1") != "0"
            and cpu_has_amx_bf16()):
        return torch.bfloat16
    return pick_dtype(dtype, device)
