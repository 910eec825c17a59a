"""Teacher scoring: every kind scores, output records the teacher, runs resume shard by shard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from matryoshka_reranker.training.teacher import (
    BiEncoderTeacher,
    load_teacher,
    score_training_file,
    teacher_identity,
)
from tests.train_fixtures import TRAIN_ROWS, one_thread, tiny_params, write_jsonl  # noqa: F401  (autouse)

UNSCORED = [{k: v for k, v in row.items() if not k.endswith("_scores")} for row in TRAIN_ROWS]
ROWS = UNSCORED + [dict(UNSCORED[0], query="why do people catch colds"), dict(UNSCORED[1], query="French capital")]


def bert_dir(tmp_path, tokenizer, head: bool):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        num_labels=1)
    model = BertForSequenceClassification(config) if head else BertModel(config)
    path = tmp_path / ("cross" if head else "bi")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Counting:
    """A real teacher that counts its calls and can fail on the n-th (an interrupted run)."""

    def __init__(self, teacher, fail_on=None):
        self.teacher, self.fail_on, self.calls = teacher, fail_on, 0

    def work(self, *args):
        return self.teacher.work(*args)

    def score_pairs(self, queries, passages, progress):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated kill")
        return self.teacher.score_pairs(queries, passages, progress)


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("kind", ["bi_encoder", "cross_encoder", "matryoshka", "hybrid"])
def test_every_teacher_kind_fills_aligned_scores(tmp_path, tokenizer, llama_dir, kind):
    model = {"bi_encoder": lambda: bert_dir(tmp_path, tokenizer, False),
             "hybrid": lambda: bert_dir(tmp_path, tokenizer, False),
             "cross_encoder": lambda: bert_dir(tmp_path, tokenizer, True), "matryoshka": lambda: llama_dir}[kind]()
    params = tiny_params(tmp_path, llama_dir, teacher__kind=kind, teacher__name_or_path=str(model))
    write_jsonl(tmp_path / "groups.jsonl", ROWS)
    rows = read(score_training_file(params))
    assert len(rows) == len(ROWS)
    for row, source in zip(rows, ROWS):
        assert row["query"] == source["query"] and row["neg"] == source["neg"]
        assert len(row["pos_scores"]) == len(row["pos"]) and len(row["neg_scores"]) == len(row["neg"])
        assert all(math.isfinite(s) for s in row["pos_scores"] + row["neg_scores"])
        assert row["teacher"]["kind"] == kind and row["teacher"]["name_or_path"] == str(model)
    if kind == "bi_encoder":  # cosine x 20
        assert all(abs(s) <= 20 + 1e-4 for r in rows for s in r["pos_scores"] + r["neg_scores"])
    if kind == "hybrid":  # per line, min-max fused into [0, 1], x 10: the best passage 10, the worst 0
        for r in rows:
            scores = r["pos_scores"] + r["neg_scores"]
            assert min(scores) >= 0 and max(scores) <= 10 + 1e-9
            assert max(scores) > min(scores)
        assert rows[0]["teacher"]["hybrid_weight"] == 0.5 and "bm25_corpus_sha256" in rows[0]["teacher"]
    if kind == "matryoshka":  # the full-depth score of a raw model, in the pipeline's input format
        from matryoshka_reranker.serving.reranker import MatryoshkaReranker

        expected = MatryoshkaReranker(llama_dir, input_format=params.model.input_format).compute_score(
            [(ROWS[0]["query"], ROWS[0]["pos"][0])])
        assert rows[0]["pos_scores"][0] == pytest.approx(expected[0], abs=1e-5)


def test_hybrid_fusion_follows_its_weight(tmp_path, tokenizer, llama_dir):
    """weight 1 = BM25 alone: a passage sharing the query's words outranks one that shares none."""
    bi = bert_dir(tmp_path, tokenizer, False)
    params = tiny_params(tmp_path, llama_dir, teacher__kind="hybrid", teacher__name_or_path=str(bi),
                         teacher__hybrid_weight=1.0)
    row = {"query": "vitamin D bone loss", "pos": ["Vitamin D deficiency is linked to bone loss."],
           "neg": ["Paris is the capital of France.", "Rhinoviruses cause most colds."]}
    write_jsonl(tmp_path / "groups.jsonl", [row, dict(row, query="capital of France")])
    rows = read(score_training_file(params))
    assert rows[0]["pos_scores"][0] == pytest.approx(10.0) and rows[1]["neg_scores"][0] == pytest.approx(10.0)


def test_non_finite_teacher_scores_fail_their_shard(tmp_path, tokenizer, llama_dir):
    from matryoshka_reranker.training.teacher import TeacherScoreError

    params = tiny_params(tmp_path, llama_dir, teacher__kind="cross_encoder",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, True)))
    write_jsonl(tmp_path / "groups.jsonl", ROWS)

    class NaNTeacher(Counting):
        def score_pairs(self, queries, passages, progress):
            scores = super().score_pairs(queries, passages, progress)
            return [float("nan")] + scores[1:] if self.calls == 2 else scores

    with pytest.raises(TeacherScoreError, match="non-finite"):
        score_training_file(params, teacher=NaNTeacher(load_teacher(params)))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000.json", "shard-00000.jsonl"]
    assert not (tmp_path / "scored.jsonl").exists()


def test_cross_encoder_teacher_scores_are_logits(tmp_path, tokenizer, llama_dir):
    """score_scale 1 is for logits: CrossEncoder.predict's default activation (a sigmoid for one label)
    would squeeze them into (0, 1), an almost flat softmax for training."""
    path = bert_dir(tmp_path, tokenizer, True)
    params = tiny_params(tmp_path, llama_dir, teacher__kind="cross_encoder", teacher__name_or_path=str(path))
    queries, passages = ["what causes colds"] * 2, ["Rhinoviruses cause colds.", "Paris is the capital of France."]
    model = BertForSequenceClassification.from_pretrained(path).eval()
    encoded = tokenizer(queries, passages, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[:, 0].tolist()
    assert load_teacher(params).score_pairs(queries, passages, lambda n: None) == pytest.approx(logits, abs=1e-5)
    assert teacher_identity(params)["output"] == "logits"  # shards of the sigmoid scores are not reused


def test_a_training_file_with_its_own_scores_keeps_them(tmp_path, tokenizer, llama_dir):
    """README, "Your own data": without teacher scores the stage fills them; scores on every line are kept.
    Scores on some lines only are all replaced (one teacher for every line, not two score scales)."""
    params = tiny_params(tmp_path, llama_dir, teacher__kind="cross_encoder",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, True)))
    write_jsonl(tmp_path / "groups.jsonl", TRAIN_ROWS)
    unused = Counting(load_teacher(params))
    rows = read(score_training_file(params, teacher=unused))
    assert unused.calls == 0
    assert [(r["pos_scores"], r["neg_scores"]) for r in rows] == [(r["pos_scores"], r["neg_scores"]) for r in TRAIN_ROWS]
    write_jsonl(tmp_path / "groups.jsonl", [*TRAIN_ROWS, UNSCORED[0]])
    rows = read(score_training_file(params))
    assert all(r["teacher"]["kind"] == "cross_encoder" for r in rows)
    assert rows[0]["pos_scores"] != TRAIN_ROWS[0]["pos_scores"]


def test_hybrid_teacher_does_not_hide_a_non_finite_neural_score(tmp_path, tokenizer, llama_dir):
    """min-max of [x, nan] is [0.5, 0.5] (nan compares false): the fusion must not turn a NaN into a target."""
    from matryoshka_reranker.training.teacher import TeacherScoreError

    params = tiny_params(tmp_path, llama_dir, teacher__kind="hybrid",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, False)))
    row = {"query": "vitamin D bone loss", "pos": ["Vitamin D deficiency is linked to bone loss."],
           "neg": ["Paris is the capital of France."]}
    write_jsonl(tmp_path / "groups.jsonl", [row])

    class NaNLast(Counting):
        def score_pairs(self, queries, passages, progress):
            return super().score_pairs(queries, passages, progress)[:-1] + [float("nan")]

    teacher = load_teacher(params, [*row["pos"], *row["neg"]])
    teacher.neural = NaNLast(teacher.neural)
    with pytest.raises(TeacherScoreError, match="non-finite"):
        score_training_file(params, teacher=teacher)
    assert not (tmp_path / "scored.jsonl").exists()


def test_bi_encoder_embeds_each_distinct_text_once(tmp_path, tokenizer, llama_dir):
    params = tiny_params(tmp_path, llama_dir, teacher__kind="bi_encoder",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, False)))
    teacher = BiEncoderTeacher(params.teacher)
    seen = []
    teacher.embed = lambda texts, progress, embed=teacher.embed: seen.extend(texts) or embed(texts, progress)
    scores = teacher.score_pairs(["q", "q", "r"], ["a", "b", "a"], lambda n: None)
    assert sorted(seen) == ["a", "b", "q", "r"] and len(scores) == 3
    same = teacher.score_pairs(["a"], ["a"], lambda n: None)
    assert same[0] == pytest.approx(1.0, abs=1e-5)  # cosine of a text with itself


def test_interrupted_scoring_resumes_and_skips_finished_shards(tmp_path, tokenizer, llama_dir):
    params = tiny_params(tmp_path, llama_dir, teacher__kind="cross_encoder",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, True)))  # shard_size 2: 3 shards
    write_jsonl(tmp_path / "groups.jsonl", ROWS)
    real = load_teacher(params)
    with pytest.raises(KeyboardInterrupt):
        score_training_file(params, teacher=Counting(real, fail_on=2))
    assert not (tmp_path / "scored.jsonl").exists()  # no partial output
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000.json", "shard-00000.jsonl"]
    resumed = Counting(real)
    score_training_file(params, teacher=resumed)
    assert resumed.calls == 2  # shards 1 and 2 only
    again = Counting(real)
    score_training_file(params, teacher=again)
    assert again.calls == 0
    fresh = tiny_params(tmp_path / "fresh", llama_dir, teacher__kind="cross_encoder",
                        teacher__name_or_path=params.teacher.name_or_path)
    (tmp_path / "fresh").mkdir()
    write_jsonl(tmp_path / "fresh" / "groups.jsonl", ROWS)
    assert read(score_training_file(fresh, teacher=real)) == read(tmp_path / "scored.jsonl")
    # A changed input line or a changed teacher setting invalidates exactly the affected shards.
    write_jsonl(tmp_path / "groups.jsonl", ROWS[:4] + [dict(ROWS[4], query="edited")])
    edited = Counting(real)
    score_training_file(params, teacher=edited)
    assert edited.calls == 1
    changed = Counting(real)
    score_training_file(params.model_copy(update={"teacher": params.teacher.model_copy(update={"max_length": 24})}),
                        teacher=changed)
    assert changed.calls == 3



def test_a_code_change_rescores_every_shard(tmp_path, tokenizer, llama_dir, monkeypatch):
    """DVC re-runs teacher scoring after a change in its code deps (say, the hybrid's fusion); the shards
    outlive the run, and the earlier code's scores were kept as this code's."""
    import shutil

    from matryoshka_reranker.training import trainer

    code = tmp_path / "code"
    shutil.copytree(Path(trainer.__file__).resolve().parents[1], code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(trainer, "CODE_ROOT", code)
    params = tiny_params(tmp_path, llama_dir, teacher__kind="cross_encoder",
                         teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, True)))  # 3 shards
    write_jsonl(tmp_path / "groups.jsonl", ROWS)
    real = load_teacher(params)
    score_training_file(params, teacher=real)
    same = Counting(real)
    score_training_file(params, teacher=same)
    assert same.calls == 0
    fusion = code / "serving" / "ranking.py"
    fusion.write_text(fusion.read_text() + "\n# another fusion\n")
    changed = Counting(real)
    score_training_file(params, teacher=changed)
    assert changed.calls == 3


@pytest.mark.slow
def test_embedded_minilm_prefers_the_relevant_passage(tmp_path, llama_dir):
    params = tiny_params(tmp_path, llama_dir, teacher__kind="bi_encoder", teacher__name_or_path="embedded:all-minilm-l6-v2")
    write_jsonl(tmp_path / "groups.jsonl", UNSCORED[:2])
    rows = read(score_training_file(params))
    for row in rows:
        assert row["pos_scores"][0] > max(row["neg_scores"])


@pytest.mark.slow
def test_two_workers_score_their_shards_and_merge_byte_identically(tmp_path, tokenizer, llama_dir):
    """distributed.processes=2: each worker scores every other shard, worker 0 merges: same file as 1 process."""
    import yaml

    from tests.fixtures import run_stage_with_workers

    outputs = {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        params = tiny_params(folder, llama_dir, teacher__kind="cross_encoder",
                             teacher__name_or_path=str(bert_dir(tmp_path, tokenizer, True)))  # 3 shards of 2 lines
        write_jsonl(folder / "groups.jsonl", ROWS)
        (folder / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
        result = run_stage_with_workers("teacher-score", folder / "params.yaml", folder, workers)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs[workers] = (folder / "scored.jsonl").read_bytes()
        if workers == 2:
            assert "worker 1 of 2 scores 1" in result.stderr and "worker 0 of 2 scores 2" in result.stderr
    assert outputs[1] == outputs[2]


def lora_dir(tmp_path, llama_dir, tokenizer, seed: int):
    """A saved LoRA adapter with non-zero weights (as a trained round would leave)."""
    from peft import LoraConfig, get_peft_model

    from matryoshka_reranker.model.modeling import MatryoshkaModel

    with torch.random.fork_rng():  # seeded here, without moving the global RNG later tests start from
        torch.manual_seed(seed)
        model = MatryoshkaModel.from_pretrained(llama_dir, tokenizer=tokenizer)
        peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                init_lora_weights=False))
    path = tmp_path / f"adapter-{seed}"
    peft.save_pretrained(path)
    return path


def test_second_round_teacher_fuses_bm25_with_a_trained_matryoshka_model(tmp_path, tokenizer, llama_dir):
    """hybrid + hybrid_neural matryoshka: BM25 fused with the adapted model's score at exit_layer;
    a retrained adapter (same path, new weights) is another teacher, so every shard is scored again."""
    from matryoshka_reranker.serving.ranking import fuse
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker

    adapter = lora_dir(tmp_path, llama_dir, tokenizer, seed=1)
    params = tiny_params(tmp_path, llama_dir, teacher__kind="matryoshka", teacher__adapters=[str(adapter)],
                         teacher__exit_layer=4)
    write_jsonl(tmp_path / "groups.jsonl", ROWS)
    rows = read(score_training_file(params))
    reference = MatryoshkaReranker(llama_dir, peft_path=[adapter], input_format=params.model.input_format,
                                   start_layer=params.model.start_layer)
    plain = MatryoshkaReranker(llama_dir, input_format=params.model.input_format, start_layer=params.model.start_layer)
    pairs = [(row["query"], p) for row in ROWS for p in row["pos"] + row["neg"]]
    got = [s for row in rows for s in row["pos_scores"] + row["neg_scores"]]
    assert got == pytest.approx(reference.compute_score(pairs, cutoff_layers=[4]), abs=1e-5)
    assert got != pytest.approx(plain.compute_score(pairs, cutoff_layers=[4]), abs=1e-3)  # the adapter counts
    assert rows[0]["teacher"]["exit_layer"] == 4 and len(rows[0]["teacher"]["adapters"][0]["sha256"]) == 64
    assert rows[0]["teacher"]["input_format"] == params.model.input_format.to_dict()  # what it read, recorded

    fused_params = tiny_params(tmp_path, llama_dir, teacher__kind="hybrid", teacher__hybrid_neural="matryoshka",
                               teacher__adapters=[str(adapter)], teacher__exit_layer=4, teacher__hybrid_weight=0.0,
                               teacher__name_or_path=str(llama_dir), paths__teacher_shards=str(tmp_path / "fused"))
    fused = read(score_training_file(fused_params))
    cursor = 0
    for row, source in zip(fused, ROWS):  # weight 0: the min-max normalised model score, x 10
        n = len(source["pos"]) + len(source["neg"])
        expected = [10 * s for s in fuse([0.0] * n, got[cursor:cursor + n], 0.0)]
        assert row["pos_scores"] + row["neg_scores"] == pytest.approx(expected, abs=1e-4)
        cursor += n
    assert fused[0]["teacher"]["hybrid_neural"] == "matryoshka"

    lora_dir(tmp_path, llama_dir, tokenizer, seed=2).rename(tmp_path / "retrained")
    import shutil

    shutil.rmtree(adapter)
    (tmp_path / "retrained").rename(adapter)
    rescored = read(score_training_file(params))
    assert rescored[0]["teacher"]["adapters"] != rows[0]["teacher"]["adapters"]
    assert rescored[0]["pos_scores"] != pytest.approx(rows[0]["pos_scores"], abs=1e-4)


@pytest.mark.parametrize("update, message", [
    ({"kind": "bi_encoder", "adapters": ["x"]}, "Matryoshka teacher"),
    ({"kind": "hybrid", "exit_layer": 8}, "hybrid_neural 'bi_encoder'"),
    ({"kind": "matryoshka", "hybrid_neural": "matryoshka"}, "is for teacher.kind hybrid"),
])
def test_adapters_are_only_for_a_matryoshka_teacher(tmp_path, llama_dir, update, message):
    with pytest.raises(ValueError, match=message):
        tiny_params(tmp_path, llama_dir, **{f"teacher__{k}": v for k, v in update.items()})


def test_a_missing_adapter_or_exit_fails_before_any_shard_is_written(tmp_path, tokenizer, llama_dir):
    write_jsonl(tmp_path / "groups.jsonl", ROWS)
    params = tiny_params(tmp_path, llama_dir, teacher__adapters=[str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere is not a LoRA adapter folder"):
        score_training_file(params)
    adapter = lora_dir(tmp_path, llama_dir, tokenizer, seed=1)
    params = tiny_params(tmp_path, llama_dir, teacher__adapters=[str(adapter)], teacher__exit_layer=7)
    with pytest.raises(ValueError, match=r"teacher.exit_layer 7: the teacher's exits are \[1, 2, 3, 4\]"):
        score_training_file(params)
    assert not list((tmp_path / "shards").glob("shard-*"))


@pytest.mark.parametrize("kind", ["bi_encoder", "cross_encoder"])
def test_teachers_settle_onemkl_kernels_when_built(tmp_path, tokenizer, llama_dir, kind):
    """The sentence-transformers teachers warm oneMKL's VML kernels and keep freed memory too
    (core/hardware.py, ``warm_cpu_math``, ``keep_freed_memory``): their processes build no MatryoshkaModel
    before scoring."""
    from matryoshka_reranker.core import hardware

    model = bert_dir(tmp_path, tokenizer, kind == "cross_encoder")
    params = tiny_params(tmp_path, llama_dir, teacher__kind=kind, teacher__name_or_path=str(model))
    hardware.warm_cpu_math.cache_clear()
    hardware.keep_freed_memory.cache_clear()
    load_teacher(params)
    assert hardware.warm_cpu_math.cache_info().misses == 1
    assert hardware.keep_freed_memory.cache_info().misses == 1
