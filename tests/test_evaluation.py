"""Per-layer evaluation: ir-measures on a hand-checkable fixture, intervals, per-query files, the
PyTorch check (which fails the stage), the untrained baseline and the learning curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from matryoshka_reranker.cli import app
from matryoshka_reranker.config import parse_params
from matryoshka_reranker.model.adapters import target_pattern
from matryoshka_reranker.model.inputs import InputFormat
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.pipeline.evaluation import (
    Candidate,
    EvalQuery,
    EvaluationCheckFailed,
    eval_identity,
    evaluate,
    learning_curve,
    per_query,
    pytorch_scorer,
    random_order_per_query,
    ratio_models,
    read_candidates,
    untrained_baseline,
)
from matryoshka_reranker.serving.artifacts import config_name

# Two queries x three candidates, BM25 order. Relevant: q1 -> d3; q2 -> d5 and d6 (all relevance 1).
CANDIDATES = [
    {"query_id": "q1", "query": "what causes colds?", "candidates": [
        {"doc_id": "d1", "text": "Paris is the capital of France.", "bm25": 3.0},
        {"doc_id": "d2", "text": "Vitamin D is made in the skin.", "bm25": 2.0},
        {"doc_id": "d3", "text": "Rhinoviruses cause most colds.", "bm25": 1.0}]},
    {"query_id": "q2", "query": "vitamin D and bones", "candidates": [
        {"doc_id": "d4", "text": "Berlin is the capital of Germany.", "bm25": 5.0},
        {"doc_id": "d5", "text": "Vitamin D deficiency is linked to bone loss.", "bm25": 4.0},
        {"doc_id": "d6", "text": "Sunlight helps the skin make vitamin D for bones.", "bm25": 3.0}]},
]
QRELS = [("q1", "d3", 1), ("q2", "d5", 1), ("q2", "d6", 1), ("q9", "d1", 1)]  # q9: not an eval query
TEXTS = {c["doc_id"]: c["text"] for row in CANDIDATES for c in row["candidates"]}


def write_fixture(root, configs, extra=()):
    """A BEIR qrels file, eval candidates and an export index under ``root``; returns params."""
    (root / "beir" / "qrels").mkdir(parents=True)
    (root / "beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    (root / "candidates.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CANDIDATES))
    (root / "onnx").mkdir()
    models = [{"name": f"exit-{k:02d}-ratio-{r}", "exit_layer": k, "ratio": r, "compress_layers": c,
               "path": f"ratio-{r}", "model_file": f"exit-{k:02d}.onnx"} for k, r, c in configs]
    all_exits = [{"ratio": r, "path": f"ratio-{r}", "model_file": "all-exits.onnx",
                  "exit_layers": sorted(k for k, rr, _ in configs if rr == r)} for r in sorted({r for _, r, _ in configs})]
    (root / "onnx" / "index.json").write_text(json.dumps({"format_version": 3, "models": models,
                                                           "all_exits": all_exits}))
    metrics = root / "metrics"
    raw = {"data": {"beir_dir": str(root / "beir"), "eval_split": "test"},
           "paths": {"onnx": str(root / "onnx"), "eval_candidates": str(root / "candidates.jsonl"),
                     "metrics": str(metrics / "per_layer.json"), "plots": str(metrics / "plots"),
                     "per_query": str(metrics / "per_query.json"), "summary": str(metrics / "summary.json"),
                     "baselines": str(metrics / "baselines.json"),
                     "learning_curve": str(metrics / "learning_curve.json"),
                     "self_distill": str(root / "adapters" / "self_distill"),
                     "compensation": str(root / "adapters" / "compensation")},
           "evaluation": {"pytorch_check": False, "bootstrap_resamples": 500, "latency_queries": 2}}
    for key, value in extra:
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return parse_params(raw)


def lookup_backends(table):
    """Stand-ins for ONNX Runtime: a fixed score per (config, passage); quality and latency agree."""
    def quality(models):
        return lambda pairs: {k: [table[f"exit-{k:02d}-ratio-{models.ratio}"][p] for _, p in pairs]
                              for k in models.exit_layers}

    def latency(config):
        return lambda pairs: [table[config.name][p] for _, p in pairs]

    return quality, latency


TABLE = {
    # q1 ranks d3 first; q2 ranks d4, d6, d5 (relevant at ranks 2 and 3)
    "exit-08-ratio-1": {TEXTS["d1"]: 0.1, TEXTS["d2"]: 0.5, TEXTS["d3"]: 0.9,
                        TEXTS["d4"]: 0.9, TEXTS["d5"]: 0.2, TEXTS["d6"]: 0.5},
    # perfect: relevant first everywhere
    "exit-16-ratio-1": {TEXTS["d1"]: 0.0, TEXTS["d2"]: 0.1, TEXTS["d3"]: 2.0,
                        TEXTS["d4"]: -1.0, TEXTS["d5"]: 1.5, TEXTS["d6"]: 1.0},
}


def test_metrics_on_a_hand_checkable_fixture(tmp_path):
    params = write_fixture(tmp_path, [(8, 1, [8]), (16, 1, [8])])
    quality, latency = lookup_backends(TABLE)
    metrics = evaluate(params, scorer_factory=quality, latency_factory=latency)

    # By hand (trec_eval: gain = relevance, discount 1/log2(rank + 1)):
    # exit 8:  q1 nDCG = 1, RR = 1.  q2 DCG = 1/log2(3) + 1/log2(4) = 1.130930, IDCG = 1 + 1/log2(3) = 1.630930,
    #          nDCG = 0.693426, RR = 1/2.  Means: nDCG 0.846713, RR 0.75, R@10 1.
    # BM25:    q1 relevant at rank 3: nDCG = 1/log2(4) = 0.5, RR = 1/3.  q2 as exit 8.
    q2 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    exit8 = metrics["configs"]["exit-08-ratio-1"]
    assert exit8["nDCG@10"] == pytest.approx((1 + q2) / 2, abs=1e-6) == pytest.approx(0.846713, abs=1e-6)
    assert exit8["RR@10"] == pytest.approx(0.75, abs=1e-6)
    assert metrics["configs"]["exit-16-ratio-1"]["nDCG@10"] == pytest.approx(1.0, abs=1e-6)
    bm25 = metrics["baselines"]["bm25"]
    assert (bm25["nDCG@10"], bm25["RR@10"], bm25["R@10"]) == pytest.approx((0.596713, 0.416667, 1.0), abs=1e-6)
    # Intervals over the two queries bracket the mean; the paired difference to BM25 is exit 8's minus BM25's.
    low, high = exit8["nDCG@10_ci"]
    assert low <= exit8["nDCG@10"] <= high and low >= q2 - 1e-6 and high <= 1 + 1e-6
    assert exit8["vs_bm25"]["nDCG@10"]["mean"] == pytest.approx(exit8["nDCG@10"] - bm25["nDCG@10"], abs=1e-6)
    assert exit8["vs_bm25"]["nDCG@10"]["n"] == 2 and 0 <= exit8["vs_bm25"]["nDCG@10"]["p_value"] <= 1
    # A random order of 3 candidates with one relevant: E[nDCG] = (1 + 1/log2(3) + 1/2) / 3 for q1.
    per_query = json.loads((tmp_path / "metrics" / "per_query.json").read_text())["systems"]
    expected_q1 = (1 + 1 / math.log2(3) + 0.5) / 3
    assert per_query["random"]["nDCG@10"]["q1"] == pytest.approx(expected_q1, abs=0.06)
    assert per_query["exit-08-ratio-1"]["nDCG@10"] == pytest.approx({"q1": 1.0, "q2": q2}, abs=1e-6)
    assert set(per_query) == {"bm25", "random", "exit-08-ratio-1", "exit-16-ratio-1"}

    assert metrics["eval"]["queries"] == 2 and metrics["eval"]["candidates"] == 3 and metrics["eval"]["pairs"] == 6
    identity = metrics["eval"]["identity"]
    assert identity["queries"] == 2 and identity["split"] == "test" and len(identity["qrels_sha256"]) == 64
    assert metrics["pytorch_check"] == {"enabled": False}
    assert exit8["exit_layer"] == 8 and exit8["latency_ms_per_query"] > 0 and exit8["latency_queries"] == 2

    assert json.loads((tmp_path / "metrics" / "per_layer.json").read_text()) == metrics
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["exit-08-ratio-1_nDCG@10"] == exit8["nDCG@10"] and summary["eval_queries"] == 2
    assert all(not isinstance(v, (dict, list)) for v in summary.values())  # flat, for `dvc exp show`
    plot_rows = json.loads((tmp_path / "metrics" / "plots" / "per_config.json").read_text())
    assert [r["config"] for r in plot_rows] == ["exit-08-ratio-1", "exit-16-ratio-1"]
    for png in ("quality_vs_exit_layer.png", "quality_vs_latency.png"):
        assert (tmp_path / "metrics" / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_a_subset_of_queries_scored_with_the_full_qrels_keeps_its_own_mean():
    """Values are keyed by the queries scored: the qrels of queries not run add no zeros."""
    queries = [EvalQuery(q, q, (Candidate("a", "a", 2.0), Candidate("b", "b", 1.0))) for q in ("q1", "q2")]
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"a": 1}, "q4": {"b": 1}}
    scores = {"q1": [2.0, 1.0], "q2": [2.0, 1.0]}
    got = per_query(queries, scores, qrels, ["RR@10"])["RR@10"]
    assert got == {"q1": 1.0, "q2": 0.5}
    unjudged = per_query(queries + [EvalQuery("q9", "q9", (Candidate("a", "a", 0.0),))],
                         {**scores, "q9": [1.0]}, qrels, ["RR@10"])["RR@10"]
    assert unjudged["q9"] == 0.0  # run but without relevant docs: 0, as before
    assert set(random_order_per_query(queries, qrels, ["RR@10"], seeds=3)["RR@10"]) == {"q1", "q2"}


def test_tied_scores_rank_the_same_way_for_every_measure():
    """ir-measures computes RR@10 with its msmarco provider (ties: doc id ascending) and nDCG@10 / R@10
    with pytrec_eval (ties: doc id descending): one run, two rankings. Every measure now ranks ties in
    trec_eval's order (doc id descending), not the candidate (BM25) order, which would hand a collapsed exit
    the first stage's quality."""
    docs = "abcdefghijklmnop"  # 16 candidates in first-stage order, all scored alike
    queries = [EvalQuery(q, q, tuple(Candidate(d, d, 0.0) for d in docs)) for q in ("first", "last")]
    qrels = {"first": {"a": 1}, "last": {"p": 1}}
    got = per_query(queries, {q.query_id: [0.0] * len(docs) for q in queries}, qrels, ["nDCG@10", "RR@10", "R@10"])
    assert {m: v["first"] for m, v in got.items()} == {"nDCG@10": 0.0, "RR@10": 0.0, "R@10": 0.0}
    assert {m: v["last"] for m, v in got.items()} == {"nDCG@10": 1.0, "RR@10": 1.0, "R@10": 1.0}
    # untied scores are ranked by score alone, whatever the candidate order or ids
    untied = per_query(queries[:1], {"first": [float(-i) for i in range(len(docs))]}, qrels, ["RR@10"])["RR@10"]
    assert untied["first"] == 1.0  # "a" scored highest


def test_console_table_names_the_configured_confidence_level():
    """The intervals are at ``evaluation.confidence``; the table must not call a 90% interval a 95% one."""
    from matryoshka_reranker.pipeline.evaluation import format_table

    entry = {"nDCG@10": 0.5, "nDCG@10_ci": [0.45, 0.55]}
    metrics = {"baselines": {"bm25": dict(entry), "random": dict(entry)},
               "configs": {"exit-08-ratio-1": {**entry, "latency_ms_per_query": 1.0}},
               "eval": {"queries": 2, "candidates": 3, "confidence": 0.9}, "pytorch_check": {"enabled": False}}
    table = format_table(metrics)
    assert "90% bootstrap interval" in table and "95%" not in table


def test_failed_scoring_leaves_last_metrics_in_place(tmp_path):
    params = write_fixture(tmp_path, [(8, 1, [8])])
    metrics_file = tmp_path / "metrics" / "per_layer.json"
    metrics_file.parent.mkdir()
    metrics_file.write_text('{"last": "good"}\n')
    nan = lambda models: (lambda pairs: {k: [math.nan] * len(pairs) for k in models.exit_layers})  # noqa: E731
    with pytest.raises(EvaluationCheckFailed, match="finite scores"):
        evaluate(params, scorer_factory=nan, latency_factory=lambda c: (lambda pairs: [0.0] * len(pairs)))
    assert metrics_file.read_text() == '{"last": "good"}\n'
    assert not (tmp_path / "metrics" / "plots").exists() and not (tmp_path / "metrics" / "per_query.json").exists()


def test_an_exit_model_that_disagrees_with_the_all_exits_pass_fails(tmp_path):
    params = write_fixture(tmp_path, [(8, 1, [8])])
    quality, _ = lookup_backends(TABLE)
    with pytest.raises(EvaluationCheckFailed, match="differs from the all-exits pass"):
        evaluate(params, scorer_factory=quality, latency_factory=lambda c: (lambda pairs: [9.0] * len(pairs)))


def test_input_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CANDIDATES[0]) + "\n" + '{"query_id": "q2", "query": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_candidates(bad)
    with pytest.raises(FileNotFoundError, match="run the export stage first"):
        ratio_models(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  onnx: {tmp_path / 'none'}\n")
    result = CliRunner().invoke(app, ["evaluate", "-p", str(params)])
    assert result.exit_code == 2 and "run the export stage first" in result.output


# ------------------------------------------------------------------ the PyTorch path on a tiny saved model

EXITS = [(3, 1, [2]), (4, 1, [2]), (3, 2, [2]), (4, 2, [2])]
FORMAT = InputFormat(query_max_len=16, passage_max_len=24)


@pytest.fixture
def tiny_pipeline(tmp_path, llama_dir):
    """A tiny Llama as the base model and three random LoRA adapters where the pipeline keeps them."""
    params = write_fixture(tmp_path, EXITS, extra=[
        ("model.name_or_path", str(llama_dir)), ("model.start_layer", 2), ("model.query_max_len", 16),
        ("model.passage_max_len", 24), ("export.exit_layers", [3, 4]), ("export.ratios", [1, 2]),
        ("export.compress_layers", [2]), ("compression.layers", [2]), ("compensation.token_ratios", [2]),
        ("evaluation.batch_size", 4)])
    for seed, folder in enumerate(params.adapter_stack(2)):
        torch.manual_seed(seed)
        model = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=target_pattern(["q_proj", "v_proj", "down_proj", "score_heads"]))
        get_peft_model(model, lora).save_pretrained(folder)
        FORMAT.save(folder)
    return params


def pytorch_backends(params, shift_exit=0):
    """Stand in for ONNX Runtime: the PyTorch model at each config (optionally scoring the wrong exit)."""
    models = {}

    def scorer(ratio):
        if ratio not in models:  # one model load per width, as the real backend loads one file per ratio
            models[ratio] = pytorch_scorer(params, ratio)
        return models[ratio]

    def quality(group):
        exits = [k - shift_exit for k in group.exit_layers]
        return lambda pairs: dict(zip(group.exit_layers, scorer(group.ratio)(pairs, exits, group.compress_layers)))

    def latency(config):
        return lambda pairs: scorer(config.ratio)(pairs, [config.exit_layer - shift_exit], config.compress_layers)[0]

    return quality, latency


def with_evaluation(params, **changes):
    return params.model_copy(update={"evaluation": params.evaluation.model_copy(update=changes)})


def test_pytorch_check_agrees_with_a_faithful_backend(tiny_pipeline):
    params = with_evaluation(tiny_pipeline, pytorch_check=True, pytorch_check_queries=0)
    quality, latency = pytorch_backends(params)
    metrics = evaluate(params, scorer_factory=quality, latency_factory=latency)
    check = metrics["pytorch_check"]
    assert check["enabled"] and check["ratio"] == 2 and check["queries"] == 2 and check["pairs"] == 6
    assert set(check["configs"]) == {"exit-03-ratio-2", "exit-04-ratio-2"} and check["dtype"] == "float32"
    assert check["max_abs_diff"] < 1e-5 and check["passed"] and check["rankings_agree"]
    assert check["max_scaled_diff"] <= check["max_abs_diff"]  # scaled by max(1, |score|): never larger
    assert set(metrics["configs"]) == {"exit-03-ratio-1", "exit-04-ratio-1", "exit-03-ratio-2", "exit-04-ratio-2"}
    # Ratio 2 merges the token adapter and compresses: its scores are not ratio 1's relabelled.
    pairs = [(row["query"], c["text"]) for row in CANDIDATES for c in row["candidates"]]
    wide = pytorch_scorer(params, 1)(pairs, [4], (2,))[0]
    narrow = pytorch_scorer(params, 2)(pairs, [4], (2,))[0]
    assert max(abs(a - b) for a, b in zip(wide, narrow)) > 1e-3


def test_pytorch_check_runs_in_float32_whatever_the_model_dtype(tiny_pipeline):
    # model.dtype auto is bf16 on CUDA: the check against the float32 export must still score in float32
    params = with_evaluation(tiny_pipeline, pytorch_check=True, pytorch_check_queries=0)
    quality, latency = pytorch_backends(params)  # float32 (CPU), as an ONNX float32 export scores
    bf16 = params.model_copy(update={"model": params.model.model_copy(update={"dtype": "bfloat16"})})
    check = evaluate(bf16, scorer_factory=quality, latency_factory=latency)["pytorch_check"]
    assert check["passed"] and check["dtype"] == "float32" and check["max_abs_diff"] < 1e-5


def test_pytorch_check_failure_fails_the_stage_and_writes_nothing(tiny_pipeline, tmp_path):
    params = with_evaluation(tiny_pipeline, pytorch_check="exit-04-ratio-1")
    quality, latency = pytorch_backends(params, shift_exit=1)  # scores exit 3 as "exit 4"
    with pytest.raises(EvaluationCheckFailed, match=r"differs from PyTorch .* on \['exit-04-ratio-1'\]"):
        evaluate(params, scorer_factory=quality, latency_factory=latency)
    assert not (tmp_path / "metrics" / "per_layer.json").exists()
    bad = with_evaluation(params, pytorch_check="exit-30-ratio-9")

    def never(*args, **kwargs):
        raise AssertionError("scored before the misnamed check was refused")

    with pytest.raises(ValueError, match="names no exported model"):  # before any scoring pass
        evaluate(bad, scorer_factory=never, latency_factory=never)


def test_untrained_baseline_and_learning_curve(tiny_pipeline, llama_dir):
    params = with_evaluation(tiny_pipeline, untrained_baseline=True, learning_curve=True)
    baselines = untrained_baseline(params)
    assert set(baselines["per_query"]) == {"exit-03-ratio-1", "exit-04-ratio-1"}
    assert baselines["input_format"] == FORMAT.to_dict()
    quality, latency = pytorch_backends(params)
    metrics = evaluate(params, scorer_factory=quality, latency_factory=latency)
    versus = metrics["configs"]["exit-04-ratio-2"]["vs_untrained"]["nDCG@10"]  # against exit 4 untrained
    expected = metrics["configs"]["exit-04-ratio-2"]["nDCG@10"] - baselines["summary"]["exit-04-ratio-1"]["nDCG@10"]
    assert versus["mean"] == pytest.approx(expected, abs=1e-6)
    assert "untrained" in metrics["baselines"]

    curve = learning_curve(params)  # step 0 (the untrained model) and the final adapter
    final_step = params.self_distill.max_steps  # no training log in the fixture: the configured steps
    assert sorted((p["step"], p["exit_layer"]) for p in curve["points"]) == [(0, 3), (0, 4), (final_step, 3),
                                                                              (final_step, 4)]
    final = next(p for p in curve["points"] if p["step"] == final_step and p["exit_layer"] == 4)
    assert final["nDCG@10_ci"][0] <= final["nDCG@10"] <= final["nDCG@10_ci"][1]
    with open(params.paths.learning_curve.replace(".json", ".png"), "rb") as png:
        assert png.read(4) == b"\x89PNG"


def test_compensation_effect_and_run_comparison(tiny_pipeline):
    from matryoshka_reranker.pipeline.effects import compare_runs, compensation_effect

    params = with_evaluation(tiny_pipeline, effects=True, learning_curve=True)
    quality, latency = pytorch_backends(params)
    evaluate(params, scorer_factory=quality, latency_factory=latency)
    result = compensation_effect(params)
    assert [(r["exit_layer"], r["ratio"]) for r in result["compensation"]] == [(3, 2), (4, 2)]
    row = result["compensation"][1]
    assert row["before"]["drop"]["mean"] == pytest.approx(row["before"]["ratio_1"] - row["before"]["ratio_2"], abs=2e-4)
    assert set(row) >= {"recovered", "recovered_ci"} and len(row["recovered_ci"]) == 2
    # Against the first stage: every (exit, ratio), the released model's mean minus BM25's, paired.
    stored = json.loads(Path(params.paths.per_query).read_text())
    bm25 = np.mean(list(stored["systems"]["bm25"]["nDCG@10"].values()))
    assert [(r["exit_layer"], r["ratio"]) for r in result["vs_first_stage"]] == [(3, 1), (4, 1), (3, 2), (4, 2)]
    for r in result["vs_first_stage"]:
        released = np.mean(list(stored["systems"][config_name(r["exit_layer"], r["ratio"])]["nDCG@10"].values()))
        assert r["after"]["mean"] == pytest.approx(released - bm25, abs=2e-4)
        assert r["bm25"] == pytest.approx(bm25, abs=1e-4)
    # Scoring the compensated models here (no export) gives the same table: the evaluate stage above
    # scored those very PyTorch models.
    direct = compensation_effect(params, after_from="pytorch")
    assert direct["after_from"] == "pytorch"
    assert json.dumps(direct["compensation"]) == json.dumps(result["compensation"])  # NaN-tolerant equality
    one_exit = params.model_copy(update={"export": params.export.model_copy(update={"exit_layers": [4]})})
    single = compensation_effect(one_exit, after_from="pytorch")  # one exit: one list of scores, not a bare list
    assert json.dumps(single["compensation"]) == json.dumps([r for r in result["compensation"] if r["exit_layer"] == 4])
    with pytest.raises(ValueError, match="after_from"):
        compensation_effect(params, after_from="onnx")
    curve = learning_curve(params)
    same = compare_runs(curve, curve, [3, 4])
    assert [r["difference"]["mean"] for r in same] == [0.0, 0.0]
    # The CLI also pairs each run with BM25's order on the params' eval set: A - BM25 = the stored difference.
    import yaml

    (Path(params.paths.learning_curve).parent / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    shown = CliRunner().invoke(app, ["compare-runs", "--a", params.paths.learning_curve, "--b",
                                     params.paths.learning_curve, "--exits", "4", "-p",
                                     str(Path(params.paths.learning_curve).parent / "params.yaml")])
    assert shown.exit_code == 0, shown.output
    final = max((p for p in curve["points"] if p["exit_layer"] == 4), key=lambda p: p["step"])
    expected = final["nDCG@10"] - bm25
    lines = [line for line in shown.output.splitlines() if "A-BM25" in line]
    assert len(lines) == 1 and f"A-BM25 {expected:+.4f}" in lines[0], shown.output
    off = compensation_effect(with_evaluation(params, effects=False))
    assert off["compensation"] == []


def test_recovered_share_interval_follows_the_configured_confidence():
    """The recovered share's interval is at ``evaluation.confidence``, like the drops' beside it, not a fixed 95%."""
    from matryoshka_reranker.pipeline.effects import _bootstrap_recovered

    rng = np.random.default_rng(0)
    b1, a1 = rng.random(40), rng.random(40)
    br, ar = b1 - 0.2 - 0.3 * rng.random(40), a1 - 0.05 - 0.3 * rng.random(40)
    got = _bootstrap_recovered(b1, br, a1, ar, confidence=0.5, resamples=2000)
    idx = np.random.default_rng(0).integers(0, 40, size=(2000, 40))  # the same joint resamples of queries
    ratios = 1 - (a1 - ar)[idx].mean(1) / (b1 - br)[idx].mean(1)
    assert got["recovered_ci"] == pytest.approx(list(np.percentile(ratios, [25, 75])), abs=1e-4)
    assert got["recovered"] == pytest.approx(1 - (a1 - ar).mean() / (b1 - br).mean(), abs=1e-4)
    wide = _bootstrap_recovered(b1, br, a1, ar, confidence=0.95, resamples=2000)["recovered_ci"]
    assert wide == pytest.approx(list(np.percentile(ratios, [2.5, 97.5])), abs=1e-4)


@pytest.mark.slow
def test_two_workers_share_evaluation_and_give_the_same_metrics(tmp_path, llama_dir):
    import yaml

    from matryoshka_reranker.pipeline.export import ExportOptions, export_models
    from tests.fixtures import run_stage_with_workers

    params = write_fixture(tmp_path, [], extra=[("model.name_or_path", str(llama_dir)), ("model.start_layer", 2),
                                                ("export.exit_layers", [3, 4]), ("export.ratios", [1]),
                                                ("evaluation.batch_size", 2)])
    export_models(llama_dir, tmp_path / "onnx2", [3, 4], [1], options=ExportOptions(start_layer=2))
    raw = params.model_dump()
    raw["paths"]["onnx"] = str(tmp_path / "onnx2")
    results = {}
    for workers in (1, 2):
        raw["paths"]["metrics"] = str(tmp_path / f"m{workers}" / "per_layer.json")
        raw["paths"]["per_query"] = str(tmp_path / f"m{workers}" / "per_query.json")
        raw["paths"]["summary"] = str(tmp_path / f"m{workers}" / "summary.json")
        raw["paths"]["plots"] = str(tmp_path / f"m{workers}" / "plots")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        done = run_stage_with_workers("evaluate", tmp_path / "params.yaml", tmp_path, workers)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[workers] = json.loads((tmp_path / f"m{workers}" / "per_query.json").read_text())
        assert not list((tmp_path / f"m{workers}").glob(".evaluate-share-*"))
    assert results[1] == results[2]  # every per-query value identical (latency aside, which is not in this file)


def test_compare_runs_refuses_curves_without_points(tmp_path):
    """The default run writes an empty learning curve (evaluation.learning_curve false): comparing two of
    them must say so, not print nothing and exit 0 as if there were nothing to report."""
    empty = {"format_version": 1, "identity": {"split": "test"}, "measures": ["nDCG@10"], "points": [],
             "note": "evaluation.learning_curve is false"}
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(empty))
    shown = CliRunner().invoke(app, ["compare-runs", "--a", str(tmp_path / "a.json"), "--b", str(tmp_path / "b.json")])
    assert shown.exit_code == 2 and "learning_curve" in shown.output, shown.output


def test_non_finite_scores_fail_the_stage_not_measure_as_a_perfect_ranking(tmp_path):
    """A quantized copy or specialist that gives NaN is scored one call per query and never compared with
    the all-exits pass: its NaN must fail the stage, not sort as nDCG 1. Likewise an exit model whose
    latency pass gives NaN must fail the same-scores check (NaN compares false with any tolerance)."""
    params = write_fixture(tmp_path, [(8, 1, [8])])
    index_file = tmp_path / "onnx" / "index.json"
    index = json.loads(index_file.read_text())
    index["models"].append({"name": "exit-08-ratio-1-int8", "exit_layer": 8, "ratio": 1, "compress_layers": [8],
                            "path": "exit-08-ratio-1-int8", "model_file": "model.onnx", "variant": "int8"})
    index_file.write_text(json.dumps(index))
    table = {**TABLE, "exit-08-ratio-1-int8": {text: math.nan for text in TEXTS.values()}}
    quality, latency = lookup_backends(table)
    with pytest.raises(EvaluationCheckFailed, match="finite"):
        evaluate(params, scorer_factory=quality, latency_factory=latency)
    assert not (tmp_path / "metrics" / "per_layer.json").exists()

    def nan_exit_model(config):
        return lambda pairs: [math.nan] * len(pairs) if config.variant is None else latency(config)(pairs)

    table["exit-08-ratio-1-int8"] = TABLE["exit-08-ratio-1"]
    with pytest.raises(EvaluationCheckFailed, match="differs from the all-exits pass"):
        evaluate(params, scorer_factory=quality, latency_factory=nan_exit_model)
    assert not (tmp_path / "metrics" / "per_layer.json").exists()


def test_no_untrained_entry_when_the_baselines_stage_scored_no_untrained_model(tmp_path):
    """The default baselines stage (evaluation.untrained_baseline false) writes the eval set's identity and no
    scores: the metrics must not list an "untrained" baseline then (they listed an empty one)."""
    params = write_fixture(tmp_path, [(8, 1, [8]), (16, 1, [8])])
    untrained_baseline(params, scorer=lambda *args: pytest.fail("scored with untrained_baseline false"))
    quality, latency = lookup_backends(TABLE)
    metrics = evaluate(params, scorer_factory=quality, latency_factory=latency)
    assert set(metrics["baselines"]) == {"bm25", "random"}
    assert all("vs_untrained" not in entry for entry in metrics["configs"].values())


def test_eval_identity_covers_texts_not_only_ids():
    """Two eval sets with the same ids, candidates and qrels but other texts are not the same eval set."""
    def eval_set(passage: str, query: str = "does x cause y?"):
        return [EvalQuery("q1", query, (Candidate("d1", passage, 2.0), Candidate("d2", "other", 1.0)))]

    qrels = {"q1": {"d1": 1}}
    base = eval_identity(eval_set("x causes y"), qrels, "test")
    assert base == eval_identity(eval_set("x causes y"), qrels, "test")
    assert eval_identity(eval_set("x causes y (re-cleaned)"), qrels, "test")["texts_sha256"] != base["texts_sha256"]
    other_query = eval_identity(eval_set("x causes y", query="does y cause x?"), qrels, "test")
    assert other_query["texts_sha256"] != base["texts_sha256"]
    assert {k: v for k, v in other_query.items() if k != "texts_sha256"} == {k: v for k, v in base.items()
                                                                              if k != "texts_sha256"}



def test_measures_count_the_tenth_rank_and_not_the_eleventh():
    """@10 means the top ten: a relevant document ranked 10th counts (nDCG 1/log2(11), RR 1/10, R 1), one ranked
    11th does not. A run cut short, or a cutoff of 9, would score the first query 0."""
    docs = [f"d{i:02d}" for i in range(12)]
    queries = [EvalQuery(q, q, tuple(Candidate(d, d, 0.0) for d in docs)) for q in ("tenth", "eleventh")]
    scores = {q.query_id: [float(len(docs) - i) for i in range(len(docs))] for q in queries}  # d00 best, d11 worst
    qrels = {"tenth": {"d09": 1}, "eleventh": {"d10": 1}}
    got = per_query(queries, scores, qrels, ["nDCG@10", "RR@10", "R@10"])
    assert {m: v["tenth"] for m, v in got.items()} == pytest.approx(
        {"nDCG@10": 1 / math.log2(11), "RR@10": 0.1, "R@10": 1.0}, abs=1e-9)
    assert {m: v["eleventh"] for m, v in got.items()} == {"nDCG@10": 0.0, "RR@10": 0.0, "R@10": 0.0}


def test_exit_models_may_differ_from_the_all_exits_pass_by_float_rounding_only():
    """Exit k's graph runs layer k for the last token alone, the all-exits graph for every token: the same
    scores up to the order of float operations, judged relative to the score (exit logits reach tens)."""
    from types import SimpleNamespace

    from matryoshka_reranker.pipeline.evaluation import _check_same_scores

    fp32, fp16 = SimpleNamespace(dtype="float32", fp16_tolerance=0.05), SimpleNamespace(dtype="float16", fp16_tolerance=0.05)
    full = {"q1": [50.0, -0.5], "q2": [3.0]}
    _check_same_scores("exit-08-ratio-1", {"q1": [50.04, -0.5009], "q2": [3.002]}, full, fp32)  # <= 1e-3 x max(1, |s|)
    with pytest.raises(EvaluationCheckFailed, match="by 0.002"):
        _check_same_scores("exit-08-ratio-1", {"q1": [50.1, -0.5], "q2": [3.0]}, full, fp32)
    _check_same_scores("exit-08-ratio-1", {"q1": [51.0, -0.5], "q2": [3.0]}, full, fp16)
    with pytest.raises(EvaluationCheckFailed, match="tolerance 0.05"):
        _check_same_scores("exit-08-ratio-1", {"q1": [53.0, -0.5], "q2": [3.0]}, full, fp16)
    with pytest.raises(EvaluationCheckFailed):
        _check_same_scores("exit-08-ratio-1", {"q1": [math.nan, -0.5], "q2": [3.0]}, full, fp16)
