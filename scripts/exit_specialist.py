"""An exit specialist: the pipeline's ratio-1 model cut after exit k, distilled from its own deepest exit.

    python scripts/exit_specialist.py -p params.yaml --exit 8 [--steps 1600] [--negatives 7]
                                      [--out models/specialist-08] [-S key=value ...] [--limit N]

Why (docs/quality.md, "Exit 8's gap"): on SciFact the shared-weight model's exit 8 stays 0.04-0.08
nDCG@10 under full depth whatever the recipe, and an exit-8 adapter on the shared weights barely moves
it; the same weights cut after layer 8 and trained for exit 8 alone on the deepest exit's scores reach
full depth (0.697 vs 0.705). Cutting is what makes that affordable: a step runs k layers, not all of
them, and the teacher pass is computed once instead of every step.

1. Teacher: the stack (``params.adapter_stack(1)``: self-distillation + layer adapter) scores every
   training group of ``paths.teacher_scored`` (its positive and ``--negatives`` hardest negatives) at
   its deepest exit, once, in the stack's ``model.dtype`` (``auto``: bf16 on CUDA and AMX CPUs).
2. Cut: the stack merged in fp32 and cut after layer k, a k-layer model with the heads of exits
   ``start_layer..k``, saved to ``OUT/base``; its exit-k scores are checked against the stack's.
3. Train: the library's self-distillation on the cut model (``train_method: teacher``: listwise CE +
   soft CE to the deepest exit's scores, loss at exit k only, fresh LoRA of rank 64 on the stack's
   ``self_distill.lora.target_modules``, trained heads kept, groups of 1 + ``--negatives``, no
   compression, ``model.dtype: auto``: fp32 weights on CPU), adapter in ``OUT/adapter``; ``-S``
   overrides go on top (e.g. ``-S self_distill.bf16_autocast=true``).
4. ``OUT/params.yaml`` scores it: ``python scripts/fusion_eval.py -p OUT/params.yaml --adapters
   self_distill --exits k`` (on the stack's eval candidates; ``-S model.dtype=float32`` at step 3 for
   fp32 scoring on an AMX CPU). Every output path in it points under OUT, so no stage run with it
   can overwrite the stack's models or metrics.

An experiment, not a pipeline stage: the pipeline does not export, gate or serve specialists yet (a
specialist has its own weights for layers 1..k, so it would ship as a variant of the exit-k config).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from matryoshka_reranker.config import apply_override, parse_params  # noqa: E402
from matryoshka_reranker.core.atomic import write_json  # noqa: E402
from matryoshka_reranker.model.adapters import merge_adapters  # noqa: E402
from matryoshka_reranker.model.modeling import MatryoshkaModel  # noqa: E402
from matryoshka_reranker.serving.reranker import MatryoshkaReranker  # noqa: E402
from matryoshka_reranker.training.data import load_training_file  # noqa: E402
from matryoshka_reranker.training.trainer import load_base, self_distill  # noqa: E402


def cut_after(model: MatryoshkaModel, k: int) -> MatryoshkaModel:
    """The first k decoder layers of ``model`` (shared, not copied) with the heads of exits <= k."""
    decoder = model.decoder
    decoder.layers = decoder.layers[:k]
    decoder.config.num_hidden_layers = k
    if getattr(decoder.config, "layer_types", None):  # per-layer attention kinds, one per layer
        decoder.config.layer_types = decoder.config.layer_types[:k]
    cut = MatryoshkaModel(decoder, model.start_layer, model.layer_sep)
    cut.score_heads.load_state_dict({name: w for name, w in model.score_heads.state_dict().items()
                                     if int(name.split(".")[0]) <= k})
    return cut.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--params", default="params.yaml", help="the pipeline whose stack is cut")
    parser.add_argument("--exit", type=int, default=8, dest="exit_layer")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--negatives", type=int, default=7, help="hardest negatives kept per training query")
    parser.add_argument("--out", type=Path, help="default: models/specialist-<exit>")
    parser.add_argument("-S", "--set", action="append", default=[], help="params override for the training")
    parser.add_argument("--limit", type=int, default=0, help="first N training queries only (a smoke test)")
    args = parser.parse_args()
    k, out = args.exit_layer, args.out or Path(f"models/specialist-{args.exit_layer:02d}")
    raw = yaml.safe_load(Path(args.params).read_text())
    params = parse_params(raw, source=args.params)
    started = time.time()

    # 1. The stack's deepest exit scores each group once: the teacher.
    examples = load_training_file(params.paths.teacher_scored, prompt=params.model.prompt)
    examples = examples[:args.limit] if args.limit else examples
    stack = MatryoshkaReranker.from_pipeline(params, ratio=1)
    if k not in stack.exit_layers[:-1]:
        sys.exit(f"--exit {k}: not one of the model's exits above its deepest ({stack.exit_layers[:-1]})")
    groups = [(e.query, e.pos[:1], e.neg[:args.negatives]) for e in examples]
    flat = stack.compute_score([(q, p) for q, pos, neg in groups for p in pos + neg],
                               cutoff_layers=[stack.exit_layers[-1]])
    out.mkdir(parents=True, exist_ok=True)
    scored, at = out / "teacher_scored.jsonl", 0
    with open(scored.with_suffix(".tmp"), "w", encoding="utf-8") as handle:
        for query, pos, neg in groups:
            line = {"query": query, "pos": pos, "neg": neg, "pos_scores": flat[at:at + 1],
                    "neg_scores": flat[at + 1:at + 1 + len(neg)]}
            at += 1 + len(neg)
            handle.write(json.dumps(line) + "\n")
    scored.with_suffix(".tmp").replace(scored)
    print(f"teacher: {len(flat)} pairs at exit {stack.exit_layers[-1]} in {time.time() - started:.0f} s", flush=True)
    del stack

    # 2. The stack merged in fp32, cut after layer k; its exit-k scores must not move.
    probe = [(q, p) for q, pos, neg in groups[:2] for p in pos + neg]
    reference = MatryoshkaReranker.from_pipeline(params, ratio=1, dtype=torch.float32).compute_score(
        probe, cutoff_layers=[k])
    fp32 = params.model_copy(update={"model": params.model.model_copy(update={"dtype": "float32"})})
    model, tokenizer, _ = load_base(fp32)
    model = merge_adapters(model, params.adapter_stack(1)).eval()
    cut = cut_after(model, k)
    cut.save_pretrained(out / "base", tokenizer=tokenizer)
    again = MatryoshkaReranker(str(out / "base"), input_format=params.model.input_format,
                               dtype=torch.float32).compute_score(probe, cutoff_layers=[k])
    drift = max(abs(a - b) for a, b in zip(reference, again))
    if drift > 1e-4:
        sys.exit(f"the cut model's exit-{k} scores differ from the stack's by {drift:.2e}")
    del model, cut

    # 3. Self-distillation of the cut model on those scores, exit k's loss only.
    exits = range(params.model.start_layer, k + 1, params.model.layer_sep)
    overrides = [
        f"model.name_or_path={out / 'base'}", f"paths.teacher_scored={scored}",
        f"paths.self_distill={out / 'adapter'}", f"paths.checkpoints={out / 'checkpoints'}",
        "compression.layers=[]", "compression.ratios=[1]", "compensation.token_ratios=[]",
        f"export.exit_layers=[{k}]", "export.ratios=[1]", "export.compress_layers=[]", "export.quantize=[]",
        "evaluation.effects=false", "evaluation.learning_curve=false",
        "compensation.layer.layer_weights={}", "compensation.token.layer_weights={}",  # exits past k are gone
        "compensation.layer.lora.layer_ranks={}", "compensation.token.lora.layer_ranks={}",
        "model.dtype=auto", f"self_distill.train_group_size={1 + args.negatives}",
        *(f"paths.{key}={out / key}" for key in ("compensation", "onnx", "teacher_shards", "validation_report",
                                                  "plots", "gate_report")),
        *(f"paths.{key}={out / 'metrics' / (key + '.json')}" for key in ("metrics", "per_query", "summary",
                                                                        "baselines", "learning_curve", "effects")),
        "self_distill.train_method=teacher", "self_distill.head_init=keep",
        "self_distill.layer_weights={" + ", ".join(f"{j}: {1.0 if j == k else 0.0}" for j in exits) + "}",
        "self_distill.lora.rank=64", "self_distill.lora.alpha=128", "self_distill.lora.layer_ranks={}",
        f"self_distill.max_steps={args.steps}", f"self_distill.save_steps={max(args.steps // 4, 1)}",
        "self_distill.snapshot_steps=[]", *args.set,
    ]
    for override in overrides:
        apply_override(raw, override)
    specialist = parse_params(raw, source=f"{args.params} + specialist overrides")
    (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = self_distill(specialist)
    write_json(out / "specialist.json", {"exit": k, "stack": [str(p) for p in params.adapter_stack(1)],
                                         "groups": len(groups), "steps": args.steps, "overrides": overrides,
                                         "exit_drift_after_cut": drift, "wall_seconds": time.time() - started,
                                         "training_seconds": summary.get("wall_seconds")})
    print(f"specialist at exit {k}: {out / 'adapter'} ({time.time() - started:.0f} s); score it with\n"
          f"  python scripts/fusion_eval.py -p {out / 'params.yaml'} --adapters self_distill --exits {k}")


if __name__ == "__main__":
    main()
