"""Does this machine's torch hit oneMKL's first-call race, and does ``warm_cpu_math`` close it?

    python scripts/first_call_check.py [--processes 40] [-p params.yaml]

Starts ``--processes`` fresh Python processes per arm, interleaved (``warmed``: as the package runs,
``unwarmed``: with ``warm_cpu_math`` disabled). Each builds the model, encodes ``export``'s validation
pairs and runs the 5-pair padded batch to exit 8, as ``export``'s PyTorch reference does, and compares
the rotary embedding's ``cos`` of that first call (and of a second, identical call) with float64
truth. oneMKL picks each vector-math kernel on a function's first call; split over threads, one
chunk can get a low-accuracy kernel (pytorch/pytorch#188792; ``core/hardware.py``). A process whose
first ``cos`` is off by more than 1e-6 is counted as hit. The race is rare, so dozens of processes per
arm are needed to see it at all.
Prints the per-arm counts and a Fisher exact test. With ``-p`` the model is built as ``export`` builds
it (``params.yaml``'s model with its ratio-1 adapter stack merged, when the stack is there), without
it the embedded model alone. Whether the race fires depends on the timing of what runs before the
first ``cos``: on the 2-core AMX host, with the trained stack, 7 of 40 unwarmed processes of this script
hit (0 of 40 warmed, p = 0.006; 4 of 157 in earlier, heavier scripts), with the bare embedded model 0 of 60
(docs/timings.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

THRESHOLD = 1e-6  # fp32 cos of these angles is within 4e-8 of float64 when the right kernel runs


def child(params_file: str | None, warmed: bool) -> dict:
    import torch

    import matryoshka_reranker.model.modeling as modeling
    from matryoshka_reranker.core.assets import resolve_model_path
    from matryoshka_reranker.model.inputs import resolve_format
    from matryoshka_reranker.pipeline.export import ExportOptions, _load_merged, validation_batches

    if not warmed:
        modeling.warm_cpu_math = lambda: None
    from transformers import AutoTokenizer

    model, stack, given, options = "embedded:smollm2-135m-instruct", [], None, ExportOptions()
    if params_file:
        from matryoshka_reranker.config import load_params

        params = load_params(params_file)
        model, given = params.model.name_or_path, params.model.input_format
        stack = params.adapter_stack(1)
        present = [p for p in stack if (p / "adapter_config.json").exists()]
        if present and len(present) < len(stack):
            raise SystemExit(f"adapter stack incomplete (train it, or run without -p): {[str(p) for p in stack]}")
        stack = present  # none trained yet: the params' model alone
        options = ExportOptions(start_layer=params.model.start_layer, layer_sep=params.model.layer_sep)
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = resolve_format([path, *stack], given).encoder(tokenizer)
    with torch.no_grad():
        net = _load_merged(path, tokenizer, stack, options).eval()
        rotary = net.decoder.rotary_emb
        cosines = []
        rotary.register_forward_hook(lambda module, args, out: cosines.append(out[0][0].clone()))  # (T, hd)
        batch = validation_batches(encoder)[0]
        for _ in range(2):
            state = net.embed(batch["input_ids"], batch["attention_mask"])
            net.advance(state, 8, {8}, (), 1)
    width = cosines[0].shape[0]
    angles = torch.arange(width, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None]  # fp32, as RoPE
    truth = torch.cat((angles, angles), -1).double().cos() * getattr(rotary, "attention_scaling", 1.0)
    errors = [float((c.double() - truth).abs().max()) for c in cosines]
    return {"warmed": warmed, "first": errors[0], "second": errors[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=40, help="fresh processes per arm")
    parser.add_argument("-p", "--params", help="params.yaml of a workspace (its model and trained adapters)")
    parser.add_argument("--child", choices=["warmed", "unwarmed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.params, args.child == "warmed")))
        return
    from scipy.stats import fisher_exact

    print(f"model: {'as export builds it from ' + args.params if args.params else 'the embedded model alone'}; "
          f"{args.processes} processes per arm", flush=True)
    hits = {"warmed": 0, "unwarmed": 0}
    worst = {"warmed": 0.0, "unwarmed": 0.0}
    for i in range(args.processes):
        for arm in ("unwarmed", "warmed") if i % 2 == 0 else ("warmed", "unwarmed"):
            run = subprocess.run([sys.executable, __file__, "--child", arm] + (["-p", args.params] if args.params else []),
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"process {i} ({arm}) failed:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            hit = result["first"] > THRESHOLD
            hits[arm] += hit
            worst[arm] = max(worst[arm], result["first"])
            if hit:
                print(f"process {i} {arm}: first cos off by {result['first']:.1e}, second call {result['second']:.1e}",
                      flush=True)
    for arm in ("unwarmed", "warmed"):
        print(f"{arm}: {hits[arm]} of {args.processes} processes hit (largest first-call cos error {worst[arm]:.1e})")
    table = [[hits["unwarmed"], args.processes - hits["unwarmed"]], [hits["warmed"], args.processes - hits["warmed"]]]
    print(f"Fisher exact (one-sided, unwarmed > warmed): p = {fisher_exact(table, alternative='greater').pvalue:.3f}")


if __name__ == "__main__":
    main()
