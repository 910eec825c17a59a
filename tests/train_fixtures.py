"""Tiny training setups shared by the training-stage tests: data files, a BEIR folder, params."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from matryoshka_reranker.config import parse_params


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy machine OpenMP barriers make them
    ~100x slower; import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TRAIN_ROWS = [
    {"query": "what causes the common cold", "pos": ["Rhinoviruses cause most colds in adults and children."],
     "neg": ["Paris is the capital of France.", "ATP synthesis happens in the mitochondria.",
             "Sunlight helps the skin make vitamin D."],
     "pos_scores": [5.0], "neg_scores": [1.0, 0.0, 2.0]},
    {"query": "capital of France", "pos": ["Paris is the capital of France."],
     "neg": ["Rome is in Italy.", "Berlin is the capital of Germany."],
     "pos_scores": [4.0], "neg_scores": [1.0, 2.0]},
    {"query": "vitamin D deficiency", "pos": ["Vitamin D deficiency is associated with bone loss."],
     "neg": ["Stem cells differentiate in vitro.", "Rhinoviruses cause most colds."],
     "pos_scores": [3.0], "neg_scores": [0.5, -1.0]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_params(tmp_path: Path, model_dir: Path, **sections):
    """Params for the tiny 4-layer model: exits 1..4, compression at layer 2, ratios 1/2."""
    raw = {
        "data": {"beir_dir": str(tmp_path / "beir"), "train_queries": 0, "negatives_per_query": 2,
                 "eval_queries": 0, "eval_candidates": 3},
        "model": {"name_or_path": str(model_dir), "start_layer": 1, "query_max_len": 12, "passage_max_len": 20},
        "teacher": {"kind": "matryoshka", "name_or_path": str(model_dir), "batch_size": 4, "max_length": 32,
                    "shard_size": 2},
        "compression": {"layers": [2], "ratios": [1, 2]},
        "self_distill": {"max_steps": 4, "save_steps": 2, "train_group_size": 3, "learning_rate": 0.01,
                         "warmup_ratio": 0.0, "deepspeed": None, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
        "compensation": {
            "token_ratios": [2],
            "layer": {"max_steps": 2, "save_steps": 2, "train_group_size": 3, "learning_rate": 0.01,
                      "train_method": "distill_last_layer", "deepspeed": None, "lora": {"rank": 4, "alpha": 8}},
            "token": {"max_steps": 2, "save_steps": 2, "train_group_size": 3, "learning_rate": 0.01,
                      "train_method": "distill_last_layer", "deepspeed": None, "lora": {"rank": 4, "alpha": 8}},
        },
        "export": {"exit_layers": [2, 4], "ratios": [1, 2], "compress_layers": [2]},
        "paths": {
            "train_groups": str(tmp_path / "groups.jsonl"), "eval_candidates": str(tmp_path / "eval.jsonl"),
            "teacher_scored": str(tmp_path / "scored.jsonl"), "teacher_shards": str(tmp_path / "shards"),
            "self_distill": str(tmp_path / "self_distill"), "compensation": str(tmp_path / "compensation"),
            "checkpoints": str(tmp_path / "checkpoints"),
        },
    }
    for dotted, value in sections.items():  # e.g. self_distill__max_steps=2
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_params(raw)


CORPUS = {
    "d1": ("Common cold", "Rhinoviruses cause most colds in adults and children."),
    "d2": ("", "Colds spread by hands; rhinoviruses survive on surfaces."),
    "d3": ("France", "Paris is the capital of France."),
    "d4": ("Germany", "Berlin is the capital of Germany and its largest city."),
    "d5": ("Vitamin D", "Sunlight helps the skin make vitamin D; deficiency causes bone loss."),
    "d6": ("Mitochondria", "ATP synthesis happens in the inner membrane of mitochondria."),
    "d7": ("Colds in winter", "Colds are common in winter; rhinoviruses and coronaviruses."),
}
QUERIES = {"q1": "what causes colds rhinoviruses", "q2": "capital of France Paris", "q3": "vitamin D sunlight",
           "q4": "cold rhinoviruses winter", "q5": "ATP mitochondria"}


def write_beir(folder: Path) -> Path:
    """A 7-document BEIR folder: train q1-q3 (q1 has a judged-irrelevant d7), test q4-q5."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as handle:
        for doc_id, (title, text) in CORPUS.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for qid, text in QUERIES.items():
            handle.write(json.dumps({"_id": qid, "text": text, "metadata": {"gold": "never read"}}) + "\n")
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq1\td7\t0\nq2\td3\t1\nq3\td5\t1\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td7\t1\nq5\td6\t1\n")
    return folder
