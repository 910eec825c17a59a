"""One-command GPU check (<= 8 minutes on one GPU, no downloads): the CUDA paths, exercised for real.

    python scripts/gpu_check.py [--model embedded:smollm2-135m-instruct] [--out /tmp/gpu-check]
    python scripts/gpu_check.py --random-weights CONFIG_DIR   # a machine without the embedded model

1. bf16 self-distillation: a few steps of the real training stage under DeepSpeed ZeRO-2 on CUDA,
   then the compensation adapters the same way;
2. fp16 ONNX export with its parity check (``export.fp16_tolerance``);
3. ONNX Runtime's CUDA provider: parity with PyTorch (fp32) and pairs/s per exit (skipped, with the
   reason, where the installed onnxruntime has no CUDA provider);
4. PyTorch (bf16) pairs/s per exit and ratio, SDPA and eager attention side by side (the
   measurement behind the per-device attention choice).

Every check runs even when an earlier one failed (later ones fall back to the base model), one
line each; the summary goes to ``<out>/gpu_check.json`` and the exit status is non-zero if any
check failed. ``--random-weights`` builds the model from a folder holding only ``config.json``
and the tokenizer (seeded random weights): the device machines here take at most 64 MiB per call,
less than the embedded model's 98 MB, and every check above is about the code path and its speed,
not about what the weights learned. Without CUDA the script exits 2 unless ``--allow-cpu`` (a dry
run of the same steps in fp32 on CPU, used to test the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

EXITS = (8, 16, 24, 30)
RATIOS = (1, 2)


def random_model(config_dir: Path, target: Path) -> Path:
    """A seeded random-weight copy of the architecture in ``config_dir`` (config + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    return target


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import onnxruntime

    found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return found


def pairs_per_second(fn, count: int, rounds: int, sync) -> float:
    fn()  # warm-up (kernels, allocator)
    sync()
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync()
    return round(rounds * count / (time.perf_counter() - started), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="CONFIG_DIR")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per speed measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on CPU (fp32): tests this script")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device visible; nothing to check here (the CPU paths are covered by `make test`)")
        return 2
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": device, "versions": versions(), "checks": {}}
    print(f"gpu_check: {device}; {json.dumps(results['versions'])}", flush=True)
    failed: list[str] = []

    def check(name, fn):
        started = time.perf_counter()
        try:
            value = fn() or {}
        except Exception as err:  # every check runs; the failure is reported with its traceback
            traceback.print_exc()
            failed.append(name)
            results["checks"][name] = {"status": "FAIL", "error": f"{type(err).__name__}: {err}"[:500]}
            print(f"FAIL {name}: {results['checks'][name]['error']}", flush=True)
            return None
        status = value.pop("status", "ok")
        results["checks"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 1), **value}
        print(f"{status:4} {name}: {json.dumps(results['checks'][name])}", flush=True)
        return results["checks"][name]

    from benchmarks.common import scifact_pairs
    from matryoshka_reranker.config import parse_params
    from matryoshka_reranker.pipeline.export import export_from_params
    from matryoshka_reranker.pipeline.prepare import prepare
    from matryoshka_reranker.serving.onnx_runtime import OnnxReranker
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker
    from matryoshka_reranker.training.compensation import compensate
    from matryoshka_reranker.training.teacher import score_training_file
    from matryoshka_reranker.training.trainer import self_distill

    model = args.model
    if args.random_weights:
        model = str(out / "model")
        check("random-weight model", lambda: {"folder": str(random_model(args.random_weights, Path(model)))})
    # The embedded teacher (MiniLM) is not on a bare device machine; the model itself teaches then.
    teacher = {"kind": "hybrid"} if not args.random_weights else {"kind": "matryoshka", "name_or_path": model}
    zero2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")
    raw = {
        "data": {"beir_dir": str(ROOT / "data" / "scifact"), "train_queries": 32, "eval_queries": 8,
                 "eval_candidates": 12},
        "model": {"name_or_path": model, "dtype": "auto"},
        "teacher": teacher,
        "compression": {"layers": [8], "ratios": list(RATIOS)},
        "self_distill": {"max_steps": args.steps, "save_steps": args.steps, "train_group_size": 8,
                         "per_device_batch_size": 4, "deepspeed": zero2, "head_init": "probe", "probe_queries": 32},
        "compensation": {"token_ratios": [2],
                         "layer": {"max_steps": 2, "save_steps": 2, "deepspeed": zero2},
                         "token": {"max_steps": 2, "save_steps": 2, "deepspeed": zero2}},
        "export": {"exit_layers": list(EXITS), "ratios": list(RATIOS), "dtype": "float16", "calibration_queries": 0},
        "paths": {k: str(out / v) for k, v in {
            "train_groups": "groups.jsonl", "eval_candidates": "eval.jsonl", "teacher_scored": "scored.jsonl",
            "teacher_shards": "shards", "self_distill": "self_distill", "compensation": "compensation",
            "checkpoints": "checkpoints", "onnx": "onnx", "validation_report": "validation"}.items()},
    }
    params = parse_params(raw)

    check("prepare + teacher", lambda: {"lines": prepare(params).train_groups,
                                        "scored": str(score_training_file(params))})
    trained = check("self-distillation (DeepSpeed ZeRO-2)", lambda: {
        k: v for k, v in self_distill(params).items() if k in ("steps", "dtype", "deepspeed", "world_size")})
    if trained:
        trained = check("compensation (DeepSpeed ZeRO-2)", lambda: {"adapters": sorted(map(str, compensate(params)))})
    exported = check("fp16 export + parity", lambda: {"configs": len(export_from_params(params)["models"])})

    pairs = scifact_pairs(args.pairs)
    import onnxruntime

    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    for ratio in RATIOS:
        def load_torch(ratio=ratio, dtype=params.model.torch_dtype()):  # bf16 on CUDA, fp32 CPU
            if trained:
                return MatryoshkaReranker.from_pipeline(params, ratio=ratio, batch_size=args.batch_size, dtype=dtype)
            return MatryoshkaReranker(model, compress_layers=[8] if ratio > 1 else (), compress_ratio=ratio,
                                      batch_size=args.batch_size, input_format=params.model.input_format,
                                      dtype=dtype)

        torch_model = load_torch()
        reference: dict = {}  # exit -> fp32 PyTorch scores of `pairs`, what the fp16 export is held to
        for k in EXITS:
            def speed(k=k):
                measured = {}
                for implementation in ("sdpa", "eager"):  # side by side, same batch
                    torch_model.model.config._attn_implementation = implementation
                    measured[implementation] = pairs_per_second(
                        lambda: torch_model.compute_score(pairs, cutoff_layers=[k]), len(pairs), args.rounds, sync)
                torch_model.model.config._attn_implementation = "sdpa"
                return {"dtype": str(torch_model.dtype).removeprefix("torch."), "batch_size": args.batch_size,
                        "pairs_per_s": measured}

            check(f"pytorch exit-{k:02d}-ratio-{ratio}", speed)

            def ort(k=k):
                if not exported:
                    return {"status": "skip", "reason": "the export check failed"}
                if not (cuda and ort_cuda):
                    return {"status": "skip", "reason": f"onnxruntime here offers {onnxruntime.get_available_providers()}"
                            " (no CUDA provider: onnxruntime-gpu is not installed)"}
                folder = out / "onnx" / f"ratio-{ratio}"
                session = OnnxReranker(folder, k, batch_size=args.batch_size)
                if session.providers[0] != "CUDAExecutionProvider":
                    raise RuntimeError(f"ONNX Runtime runs {folder.name} on {session.providers[0]}, not CUDA")
                if not reference:  # not the bf16 model timed above: bf16 alone differs from fp32 beyond the tolerance
                    fp32 = load_torch(dtype=torch.float32)
                    reference.update(zip(EXITS, fp32.compute_score(pairs, cutoff_layers=list(EXITS))))
                    del fp32
                expected = reference[k]
                got = session.compute_score(pairs)
                diff = max(abs(a - b) for a, b in zip(got, expected))
                # as evaluate's PyTorch check: |ORT - PyTorch| / max(1, |PyTorch|) (raw exit logits reach tens)
                scaled = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, expected))
                if not scaled <= params.export.fp16_tolerance:
                    raise RuntimeError(f"|ORT CUDA fp16 - PyTorch fp32| / max(1, |score|) = {scaled:.3g} "
                                       f"> {params.export.fp16_tolerance}")
                return {"max_abs_diff": round(diff, 5), "max_scaled_diff": round(scaled, 5),
                        "pairs_per_s": pairs_per_second(lambda: session.compute_score(pairs), len(pairs),
                                                        args.rounds, sync)}

            check(f"onnxruntime-cuda exit-{k:02d}-ratio-{ratio}", ort)
        del torch_model
    results["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    verdict = f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "all checks passed (skips listed)"
    print(f"gpu_check: {verdict}; {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
