"""Self-distillation step time: our shared-prefix step vs upstream's two full passes, side by side.

Both steps compute the same loss and gradients (``tests/test_training.py`` checks equality) on
the same LoRA model and batch:

* naive (upstream FlagEmbedding): a compressed forward pass and a full-width forward pass, both
  from the embedding up and both recording autograd, then backward; it runs both passes even
  when the step samples no compression;
* ours: the layers before the compression layer once, the full-width continuation without
  autograd, the compressed continuation with it; a single pass when nothing is compressed; every pass
  runs its deepest layer for each row's last token only (``modeling.last_token_layer``, since 2026-12-07);
* whole: ours with the deepest layer run for every token (the step before 2026-12-07), which upstream
  does too, so ``naive`` runs it that way.

Timings interleave ratios and variants (warm-up first) so machine load hits all alike; the
figures use each variant's fastest step (least disturbed by other processes, as ``timeit`` does),
with the ratio of medians alongside. Default: the embedded SmolLM2-135M, one group of 4, CPU.

    python benchmarks/bench_train_step.py                   # embedded SmolLM2-135M
    python benchmarks/bench_train_step.py --model tiny      # a tiny random Llama (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures for --model tiny

from benchmarks.common import whole_last_layer  # noqa: E402
from matryoshka_reranker.config import LoraParams  # noqa: E402
from matryoshka_reranker.model.adapters import lora_config  # noqa: E402
from matryoshka_reranker.model.losses import TrainMethod, matryoshka_loss  # noqa: E402
from matryoshka_reranker.model.modeling import MatryoshkaModel  # noqa: E402
from matryoshka_reranker.training.trainer import MatryoshkaTrainingModel, load_base  # noqa: E402

QUERY = "Vitamin D deficiency is associated with a higher risk of bone fractures in older adults."
PASSAGE = ("Low serum 25-hydroxyvitamin D concentrations were associated with lower bone mineral density "
           "and a higher incidence of hip fractures in a cohort of community-dwelling adults over 65 years, "
           "after adjustment for age, sex, body mass index, physical activity and season of blood sampling. ") * 3


def build(args):
    from peft import get_peft_model

    from matryoshka_reranker.config import parse_params

    if args.model == "tiny":
        from tests.fixtures import make_tiny_model, make_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
        tokenizer = make_tokenizer()
        make_tiny_model("llama", tokenizer, num_layers=12).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        name, start, compress_layer = str(folder), 1, 4
    else:
        name, start, compress_layer = args.model, args.start_layer, args.compress_layer
    params = parse_params({"model": {"name_or_path": name, "start_layer": start},
                           "export": {"exit_layers": [], "compress_layers": [compress_layer]},
                           "compression": {"layers": [compress_layer]}})
    model, tokenizer, _ = load_base(params, tokenizer=None)
    method = TrainMethod(args.train_method)
    step = MatryoshkaTrainingModel.from_model(model, method, args.group_size)
    peft_model = get_peft_model(step, lora_config(LoraParams(dropout=0.0))).train()
    encoder = params.model.input_format.encoder(tokenizer)
    pairs = [encoder.encode(QUERY, PASSAGE[i * 7 :]) for i in range(args.batch * args.group_size)]
    batch = encoder.collate(pairs)
    batch["teacher_scores"] = torch.randn(args.batch, args.group_size)
    return peft_model, batch, method, compress_layer


def ours(peft_model, batch, layers, ratio):
    out = peft_model(**batch, compress_layers=layers, compress_ratio=ratio)
    out["loss"].backward()
    return out["loss"].item()


def whole(peft_model, batch, layers, ratio):
    with whole_last_layer():
        return ours(peft_model, batch, layers, ratio)


@whole_last_layer()
def naive(peft_model, batch, layers, ratio, method):
    """Upstream: two complete forward passes with autograd (deepest layer whole), then the same loss."""
    model = peft_model.get_base_model()
    inputs = {k: v for k, v in batch.items() if k != "teacher_scores"}
    exits = model.exit_layers
    student = MatryoshkaModel.forward(model, **inputs, cutoff_layers=exits, compress_layers=layers, compress_ratio=ratio)
    full = MatryoshkaModel.forward(model, **inputs, cutoff_layers=exits) if method.needs_full_width else None
    group = lambda scores: [s.view(-1, model.group_size) for s in scores]  # noqa: E731
    loss, _ = matryoshka_loss(group(student), method, group(full) if full else None, batch["teacher_scores"])
    loss.backward()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="folder, embedded:..., or 'tiny'")
    parser.add_argument("--start-layer", type=int, default=4)
    parser.add_argument("--compress-layer", type=int, default=8)
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="groups per step")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant and ratio")
    parser.add_argument("--train-method", default="distill_fix_layer_teacher")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peft_model, batch, method, compress_layer = build(args)
    print(f"model {args.model}, batch {args.batch} x group {args.group_size}, tokens/row <= "
          f"{batch['input_ids'].shape[1]}, compress at layer {compress_layer}, method {method.name}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'ratio':>5} {'ours s':>8} {'whole s':>8} {'naive s':>8} {'naive/ours':>10} {'(medians)':>10} "
          f"{'whole/ours':>10} {'(medians)':>10} {'loss diff':>10}")
    variants = ("ours", "whole", "naive")
    times = {(ratio, name): [] for ratio in args.ratios for name in variants}
    losses = {}
    for rep in range(args.reps + 1):  # rep 0 warms up; ratios and variants interleave so load hits all alike
        for ratio in args.ratios:
            layers = [compress_layer] if ratio > 1 else []
            for name in variants[rep % 3:] + variants[:rep % 3]:  # each variant in each position in turn
                peft_model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                losses[ratio, name] = (ours(peft_model, batch, layers, ratio) if name == "ours"
                                       else whole(peft_model, batch, layers, ratio) if name == "whole"
                                       else naive(peft_model, batch, layers, ratio, method))
                if rep:
                    times[ratio, name].append(time.perf_counter() - start)
    best = {}
    for ratio in args.ratios:
        t = {name: min(times[ratio, name]) for name in variants}
        m = {name: statistics.median(times[ratio, name]) for name in variants}
        best[ratio] = (t["ours"], t["naive"])
        diff = max(abs(losses[ratio, "ours"] - losses[ratio, name]) for name in variants)
        print(f"{ratio:>5} {t['ours']:>8.3f} {t['whole']:>8.3f} {t['naive']:>8.3f} {t['naive'] / t['ours']:>10.2f} "
              f"{m['naive'] / m['ours']:>10.2f} {t['whole'] / t['ours']:>10.2f} {m['whole'] / m['ours']:>10.2f} "
              f"{diff:>10.1e}")
    if 1 in best:  # training draws a ratio uniformly and the (one) compression layer on with p = 1/2
        off = (1 + 0.5 * (len(args.ratios) - 1)) / len(args.ratios)  # steps that run at full width
        weights = {r: off if r == 1 else 0.5 / len(args.ratios) for r in args.ratios}
        expected_ours = sum(w * best[r][0] for r, w in weights.items())
        expected_naive = sum(w * best[r][1] for r, w in weights.items())
        print(f"expected step over training's compression draws: ours {expected_ours:.3f} s, naive "
              f"{expected_naive:.3f} s, speed-up {expected_naive / expected_ours:.2f}x")

if __name__ == "__main__":
    main()
