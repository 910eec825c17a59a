"""Device and dtype choice: training fp32 on every CPU; scoring bf16 where the CPU has AMX-BF16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from scipy.stats import spearmanr

from matryoshka_reranker import MatryoshkaReranker
from matryoshka_reranker.core import hardware
from matryoshka_reranker.core.hardware import CPU_BF16_ENV, pick_dtype, pick_inference_dtype

CPU = torch.device("cpu")


@pytest.fixture
def amx(monkeypatch):
    """This CPU as one with AMX-BF16 tiles (or without: ``amx(False)``), whatever it really has."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_amx(present: bool = True):
        monkeypatch.setattr(hardware, "cpu_has_amx_bf16", lambda: present)
    return set_amx


def test_training_dtype_is_fp32_on_any_cpu(amx):
    amx(True)
    assert pick_dtype(None, CPU) == pick_dtype("auto", CPU) == torch.float32
    assert pick_dtype("bfloat16", CPU) == torch.bfloat16 and pick_dtype(torch.float16, CPU) == torch.float16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        pick_dtype("float16", CPU)
    with pytest.raises(ValueError, match="dtype must be one of"):
        pick_dtype("int8", CPU)


def test_scoring_dtype_is_bf16_only_on_amx_cpus(amx, monkeypatch):
    amx(False)
    assert pick_inference_dtype(None, CPU) == torch.float32
    amx(True)
    assert pick_inference_dtype(None, CPU) == pick_inference_dtype("auto", CPU) == torch.bfloat16
    assert pick_inference_dtype("float32", CPU) == torch.float32  # an explicit choice always wins
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert pick_inference_dtype(None, CPU) == torch.float32


def test_amx_detection_answers_without_raising():
    assert isinstance(hardware.cpu_has_amx_bf16(), bool)


def test_reranker_scores_in_bf16_on_amx_and_keeps_the_ranking(amx, llama_dir):
    pairs = [("what causes colds?", f"passage {i}: " + "rhinovirus and sneezing " * (i + 1)) for i in range(8)]
    amx(True)
    half = MatryoshkaReranker(llama_dir, start_layer=2)
    amx(False)
    full = MatryoshkaReranker(llama_dir, start_layer=2)
    assert half.dtype == torch.bfloat16 and next(half.model.decoder.parameters()).dtype == torch.bfloat16
    assert full.dtype == torch.float32
    # the heads score in fp32 under the bf16 decoder: bf16 logits are coarse enough to tie candidates
    assert {p.dtype for p in half.model.score_heads.parameters()} == {torch.float32}
    a, b = half.compute_score(pairs, cutoff_layers=4), full.compute_score(pairs, cutoff_layers=4)
    assert all(isinstance(x, float) for x in a) and len(set(a)) == len(a)
    spread = max(b) - min(b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.1 * spread + 1e-2
    assert spearmanr(a, b).statistic > 0.8


def test_cli_takes_a_dtype(llama_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "what causes colds?", "passage": "Rhinoviruses."}) + "\n")
    base = ["score", "--model", str(llama_dir), "--pairs", str(pairs), "--start-layer", "2", "--cutoff-layers", "4"]
    fp32 = CliRunner().invoke(app, [*base, "--dtype", "float32"])
    bf16 = CliRunner().invoke(app, [*base, "--dtype", "bfloat16"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    a, b = json.loads(fp32.stdout)["4"], json.loads(bf16.stdout)["4"]
    assert a != b and abs(a - b) < 0.5  # bf16 rounds, by a little
    bad = CliRunner().invoke(app, [*base, "--dtype", "int8"])
    assert bad.exit_code == 2 and "dtype must be one of" in bad.output


def test_building_a_model_first_settles_onemkl_kernels(llama_dir, monkeypatch):
    """oneMKL's first-call race (core/hardware.py, ``warm_cpu_math``): every model is built after a
    one-element call of each VML-backed op, whose results are the ops' own."""
    hardware.warm_cpu_math.cache_clear()
    seen = []
    for name in hardware._VML_OPS:
        op = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, _op=op, _name=name: seen.append((_name, x.numel(), x.dtype)) or _op(x))
    MatryoshkaReranker(llama_dir, start_layer=2)
    monkeypatch.undo()
    one_element = {(n, d) for n, k, d in seen if k == 1}
    assert one_element == {(n, d) for n in hardware._VML_OPS for d in (torch.float32, torch.float64)}
    assert hardware.warm_cpu_math.cache_info().misses == 1
    MatryoshkaReranker(llama_dir, start_layer=2)
    assert hardware.warm_cpu_math.cache_info().misses == 1  # once per process


_MALLOC_SCRIPT = """
import ctypes, torch
from matryoshka_reranker.core import hardware

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
kept = hardware.keep_freed_memory()
for _ in range(2):  # an activation-sized tensor, written, freed (over glibc's largest dynamic threshold, 32 MiB)
    held = torch.ones(12 << 20)  # 48 MiB
    mapped, heap = mallinfo2().hblkhd, mallinfo2().arena
    del held
print(kept, mapped >> 20, heap >> 20, mallinfo2().arena >> 20)
"""


def _malloc_state(env: dict) -> list[int | bool]:
    out = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return [out[0] == "True", *map(int, out[1:])]


def _glibc_235() -> bool:
    try:
        major, minor = os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2]
        return (int(major), int(minor)) >= (2, 35)
    except (AttributeError, ValueError, OSError, IndexError):
        return False


@pytest.mark.skipif(not _glibc_235(), reason="glibc >= 2.35: mallinfo2, and mmap thresholds over 32 MiB")
def test_kept_freed_memory_serves_activations_from_the_heap_and_keeps_them():
    """``keep_freed_memory``: a 48 MiB activation comes from the heap and stays there when freed, for the
    next op to reuse (as glibc comes it is mmapped, and unmapped on free: every use faults its 12,288 pages
    in again; ``benchmarks/bench_allocator.py`` counts the faults of whole passes); ``MATRYOSHKA_CPU_MALLOC=0``
    leaves glibc as it is."""
    kept, mapped, heap_held, heap_after = _malloc_state({hardware.CPU_MALLOC_ENV: "1"})
    assert kept is True and mapped < 48  # not mmapped: from the heap
    assert heap_held >= 48 and heap_after == heap_held  # and the heap does not shrink when it is freed
    off, mapped, _, _ = _malloc_state({hardware.CPU_MALLOC_ENV: "0"})
    assert off is False and mapped >= 48  # glibc as it comes: mmapped


def test_building_a_model_keeps_freed_memory(llama_dir, monkeypatch):
    monkeypatch.delenv(hardware.CPU_MALLOC_ENV, raising=False)
    hardware.keep_freed_memory.cache_clear()
    MatryoshkaReranker(llama_dir, start_layer=2)
    assert hardware.keep_freed_memory.cache_info().misses == 1
    if _glibc_235():
        assert hardware.keep_freed_memory() is True  # and it took
