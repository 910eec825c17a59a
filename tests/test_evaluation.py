"""Per-layer evaluation: ir-measures on a hand-checkable fixture, the PyTorch check, files and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from matryoshka_reranker.adapters import target_pattern
from matryoshka_reranker.cli import app
from matryoshka_reranker.config import parse_params
from matryoshka_reranker.evaluation import evaluate, pytorch_scorer, read_candidates, read_index
from matryoshka_reranker.modeling import MatryoshkaModel

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


def write_fixture(root, configs, extra=()):
    """A BEIR qrels file, eval candidates and an export index under ``root``; returns params."""
    (root / "beir" / "qrels").mkdir(parents=True)
    (root / "beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    (root / "candidates.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CANDIDATES))
    (root / "onnx").mkdir()
    models = [{"name": f"exit-{k:02d}_ratio-{r}", "exit_layer": k, "ratio": r, "compress_layers": c,
               "path": f"exit-{k:02d}_ratio-{r}"} for k, r, c in configs]
    (root / "onnx" / "index.json").write_text(json.dumps({"format_version": 1, "models": models}))
    raw = {"data": {"beir_dir": str(root / "beir"), "eval_split": "test"},
           "paths": {"onnx": str(root / "onnx"), "eval_candidates": str(root / "candidates.jsonl"),
                     "metrics": str(root / "metrics" / "per_layer.json"), "plots": str(root / "metrics" / "plots"),
                     "self_distill": str(root / "adapters" / "self_distill"),
                     "compensation": str(root / "adapters" / "compensation")},
           "evaluation": {"pytorch_check": False}}
    for key, value in extra:
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return parse_params(raw)


def lookup_scorer(table):
    """Backend stand-in: a fixed score per (config, passage)."""
    return lambda config: (lambda pairs: [table[config.name][p] for _, p in pairs])


def test_metrics_on_a_hand_checkable_fixture(tmp_path):
    params = write_fixture(tmp_path, [(8, 1, [8]), (16, 1, [8])])
    texts = {c["doc_id"]: c["text"] for row in CANDIDATES for c in row["candidates"]}
    table = {
        # q1 ranks d3 first; q2 ranks d4, d6, d5 (relevant at ranks 2 and 3)
        "exit-08_ratio-1": {texts["d1"]: 0.1, texts["d2"]: 0.5, texts["d3"]: 0.9,
                            texts["d4"]: 0.9, texts["d5"]: 0.2, texts["d6"]: 0.5},
        # perfect: relevant first everywhere
        "exit-16_ratio-1": {texts["d1"]: 0.0, texts["d2"]: 0.1, texts["d3"]: 2.0,
                            texts["d4"]: -1.0, texts["d5"]: 1.5, texts["d6"]: 1.0},
    }
    metrics = evaluate(params, scorer_factory=lookup_scorer(table))

    # By hand (trec_eval: gain = relevance, discount 1/log2(rank + 1)):
    # exit 8:  q1 nDCG = 1, RR = 1.  q2 DCG = 1/log2(3) + 1/log2(4) = 1.130930, IDCG = 1 + 1/log2(3) = 1.630930,
    #          nDCG = 0.693426, RR = 1/2.  Means: nDCG 0.846713, RR 0.75, R@10 1.
    # BM25:    q1 relevant at rank 3: nDCG = 1/log2(4) = 0.5, RR = 1/3.  q2 as exit 8.
    #          Means: nDCG 0.596713, RR 0.416667, R@10 1.
    q2 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["configs"]["exit-08_ratio-1"]["nDCG@10"] == pytest.approx((1 + q2) / 2, abs=1e-6)
    assert metrics["configs"]["exit-08_ratio-1"]["nDCG@10"] == pytest.approx(0.846713, abs=1e-6)
    assert metrics["configs"]["exit-08_ratio-1"]["RR@10"] == pytest.approx(0.75, abs=1e-6)
    assert metrics["configs"]["exit-16_ratio-1"]["nDCG@10"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["baseline"]["bm25"] == pytest.approx({"nDCG@10": 0.596713, "RR@10": 0.416667, "R@10": 1.0},
                                                        abs=1e-6)
    assert metrics["eval"] == {"queries": 2, "candidates": 3, "pairs": 6}
    assert metrics["pytorch_check"] == {"enabled": False}
    config = metrics["configs"]["exit-08_ratio-1"]
    assert list(config) == ["exit_layer", "ratio", "nDCG@10", "RR@10", "R@10", "latency_ms_per_query", "pairs_per_s"]
    assert config["exit_layer"] == 8 and config["latency_ms_per_query"] > 0 and config["pairs_per_s"] > 0

    written = json.loads((tmp_path / "metrics" / "per_layer.json").read_text())
    assert written == metrics
    plot_rows = json.loads((tmp_path / "metrics" / "plots" / "per_config.json").read_text())
    assert [r["config"] for r in plot_rows] == ["exit-08_ratio-1", "exit-16_ratio-1"]
    assert plot_rows[0]["nDCG@10"] == config["nDCG@10"] and plot_rows[0]["ratio"] == 1
    for png in ("quality_vs_exit_layer.png", "quality_vs_latency.png"):
        assert (tmp_path / "metrics" / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_failed_scoring_leaves_last_metrics_in_place(tmp_path):
    params = write_fixture(tmp_path, [(8, 1, [8])])
    metrics_file = tmp_path / "metrics" / "per_layer.json"
    metrics_file.parent.mkdir()
    metrics_file.write_text('{"last": "good"}\n')
    with pytest.raises(ValueError, match="finite scores"):
        evaluate(params, scorer_factory=lambda config: (lambda pairs: [math.nan] * len(pairs)))
    assert metrics_file.read_text() == '{"last": "good"}\n'
    assert not (tmp_path / "metrics" / "plots").exists()


def test_input_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CANDIDATES[0]) + "\n" + '{"query_id": "q2", "query": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_candidates(bad)
    with pytest.raises(FileNotFoundError, match="run the export stage first"):
        read_index(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  onnx: {tmp_path / 'none'}\n")
    result = CliRunner().invoke(app, ["evaluate", "-p", str(params)])
    assert result.exit_code == 2 and "run the export stage first" in result.output


# ------------------------------------------------------------------ the PyTorch path on a tiny saved model

EXITS = [(3, 1, [2]), (4, 1, [2]), (3, 2, [2]), (4, 2, [2])]


@pytest.fixture
def tiny_pipeline(tmp_path, llama_dir):
    """A tiny Llama as the base model and three random LoRA adapters where the pipeline keeps them."""
    params = write_fixture(tmp_path, EXITS, extra=[
        ("model.name_or_path", str(llama_dir)), ("model.start_layer", 2), ("model.query_max_len", 16),
        ("model.passage_max_len", 24), ("export.exit_layers", [3, 4]), ("export.ratios", [1, 2]),
        ("export.compress_layers", [2]), ("compensation.token_ratios", [2]), ("evaluation.batch_size", 4)])
    for seed, folder in enumerate(params.adapter_stack(2)):
        torch.manual_seed(seed)
        model = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=target_pattern(["q_proj", "v_proj", "down_proj", "score_heads"]))
        get_peft_model(model, lora).save_pretrained(folder)
    return params


def pytorch_backend(params, shift_exit=0):
    """Stands in for ONNX Runtime: the PyTorch model at each config (optionally at the wrong exit)."""
    models = {}

    def make(config):
        if config.ratio not in models:  # one model load per width, as the real backend loads one per file
            models[config.ratio] = pytorch_scorer(params, config.ratio)
        score = models[config.ratio]
        return lambda pairs: score(pairs, [config.exit_layer - shift_exit], config.compress_layers)[0]
    return make


def test_pytorch_check_agrees_with_a_faithful_backend(tiny_pipeline):
    params = tiny_pipeline.model_copy(update={"evaluation": tiny_pipeline.evaluation.model_copy(
        update={"pytorch_check": True, "pytorch_check_queries": 0})})
    metrics = evaluate(params, scorer_factory=pytorch_backend(params))
    check = metrics["pytorch_check"]
    assert check["enabled"] and check["ratio"] == 2 and check["queries"] == 2 and check["pairs"] == 6
    assert set(check["configs"]) == {"exit-03_ratio-2", "exit-04_ratio-2"}
    assert check["max_abs_diff"] < 1e-5 and check["passed"] and check["rankings_agree"]
    assert set(metrics["configs"]) == {"exit-03_ratio-1", "exit-04_ratio-1", "exit-03_ratio-2", "exit-04_ratio-2"}
    # Ratio 2 merges the token adapter and compresses: its scores are not ratio 1's relabelled.
    pairs = [(row["query"], c["text"]) for row in CANDIDATES for c in row["candidates"]]
    wide = pytorch_scorer(params, 1)(pairs, [4], (2,))[0]
    narrow = pytorch_scorer(params, 2)(pairs, [4], (2,))[0]
    assert max(abs(a - b) for a, b in zip(wide, narrow)) > 1e-3
    for values in metrics["configs"].values():
        assert all(0.0 <= values[m] <= 1.0 for m in ("nDCG@10", "RR@10", "R@10"))


def test_pytorch_check_catches_a_wrong_backend(tiny_pipeline):
    params = tiny_pipeline.model_copy(update={"evaluation": tiny_pipeline.evaluation.model_copy(
        update={"pytorch_check": "exit-04_ratio-1"})})
    metrics = evaluate(params, scorer_factory=pytorch_backend(params, shift_exit=1))  # scores exit 3 as "exit 4"
    check = metrics["pytorch_check"]
    assert list(check["configs"]) == ["exit-04_ratio-1"] and check["ratio"] == 1
    assert check["max_abs_diff"] > 1e-3 and not check["passed"]

    bad = params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"pytorch_check": "exit-30_ratio-9"})})
    with pytest.raises(ValueError, match="names no exported model"):
        evaluate(bad, scorer_factory=pytorch_backend(bad))
