"""The scoring API: shapes of results, ordering, validation, adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from matryoshka_reranker import MatryoshkaReranker
from matryoshka_reranker.model.adapters import target_pattern
from matryoshka_reranker.model.inputs import InputFormat, InputFormatError
from matryoshka_reranker.model.modeling import MatryoshkaModel
from tests.fixtures import cpp_compiler

PAIRS = [("what causes colds?", "Rhinoviruses cause most colds."), ("capital of France", "Paris is the capital."),
         ("q", "a much longer passage about vitamin D and sunlight and bones " * 3)]


@pytest.fixture
def reranker(llama_dir):
    return MatryoshkaReranker(llama_dir, start_layer=2, batch_size=2)


def test_result_shapes(reranker):
    one = reranker.compute_score(PAIRS, cutoff_layers=4)
    assert isinstance(one, list) and len(one) == 3 and all(isinstance(x, float) for x in one)
    two = reranker.compute_score(PAIRS, cutoff_layers=[4, 2])
    assert len(two) == 2 and two[0] == pytest.approx(one, abs=1e-6)
    single = reranker.compute_score(PAIRS[0], cutoff_layers=4)
    assert single == pytest.approx(one[0], abs=1e-5)
    assert reranker.compute_score(PAIRS[0], cutoff_layers=[2, 4]) == pytest.approx([two[1][0], two[0][0]], abs=1e-5)


def test_order_restored_and_normalize(reranker):
    forward = reranker.compute_score(PAIRS, cutoff_layers=[3])
    backward = reranker.compute_score(PAIRS[::-1], cutoff_layers=[3])
    assert backward == pytest.approx(forward[::-1], abs=1e-5)
    probs = reranker.compute_score(PAIRS, cutoff_layers=3, normalize=True)
    assert probs == pytest.approx(torch.sigmoid(torch.tensor(forward)).tolist(), abs=1e-6)


def test_compression_option(reranker):
    plain = reranker.compute_score(PAIRS, cutoff_layers=4)
    compressed = reranker.compute_score(PAIRS, cutoff_layers=4, compress_layers=[2], compress_ratio=4)
    assert compressed != pytest.approx(plain, abs=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pairs=[]), ValueError, "at least one"),
        (dict(pairs=[("q", 3)]), TypeError, "strings"),
        (dict(pairs=["just a string"]), TypeError, "tuple"),
        (dict(pairs=PAIRS, cutoff_layers=[9]), ValueError, "no score head"),
        (dict(pairs=PAIRS, compress_layers=[2], compress_ratio=0), ValueError, "compress_ratio"),
    ],
)
def test_clear_errors(reranker, kwargs, error, match):
    with pytest.raises(error, match=match):
        reranker.compute_score(**kwargs)


def test_format_beyond_the_model_is_refused(llama_dir):
    with pytest.raises(ValueError, match="more than the model attends to"):
        MatryoshkaReranker(llama_dir, input_format=InputFormat(query_max_len=64, passage_max_len=4000))


def test_flagembedding_call_shapes(reranker):
    one = reranker.compute_score(PAIRS, cutoff_layers=4)
    assert reranker.compute_score(list(PAIRS[0]), cutoff_layers=4) == pytest.approx(one[0], abs=1e-5)  # ["q", "p"]
    aliased = reranker.compute_score(PAIRS, cutoff_layers=4, compress_layer=[2], compress_ratio=2)
    named = reranker.compute_score(PAIRS, cutoff_layers=4, compress_layers=[2], compress_ratio=2)
    assert aliased == pytest.approx(named, abs=1e-6)
    with pytest.raises(ValueError, match="not both"):
        reranker.compute_score(PAIRS, compress_layer=[2], compress_layers=[2], compress_ratio=2)


def test_rank_returns_sentence_transformers_shape(reranker):
    documents = [p for _, p in PAIRS]
    scores = reranker.compute_score([("what causes colds?", d) for d in documents], cutoff_layers=4)
    ranked = reranker.rank("what causes colds?", documents, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == sorted(range(3), key=lambda i: -scores[i])
    assert [r["score"] for r in ranked] == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    assert all(r["text"] == documents[r["corpus_id"]] for r in ranked)
    top = reranker.rank("what causes colds?", documents, top_k=1)
    assert top == [{"corpus_id": ranked[0]["corpus_id"], "score": pytest.approx(ranked[0]["score"], abs=1e-5)}]
    assert reranker.rank("q", []) == []  # as sentence-transformers' CrossEncoder.rank
    with pytest.raises(TypeError, match="documents\\[1\\]"):
        reranker.rank("q", ["a", 3])


def test_rank_fuses_with_first_stage_scores(reranker):
    """score = w * minmax(first stage) + (1 - w) * minmax(ours), per query; ours kept beside it."""
    documents = [p for _, p in PAIRS]
    ours = reranker.compute_score([("what causes colds?", d) for d in documents], cutoff_layers=4)
    first = [3.0, 9.0, 5.0]
    lo, hi = min(ours), max(ours)
    expected = [0.3 * (f - 3.0) / 6.0 + 0.7 * (o - lo) / (hi - lo) for f, o in zip(first, ours)]
    ranked = reranker.rank("what causes colds?", documents, first_stage_scores=first, first_stage_weight=0.3)
    assert [r["corpus_id"] for r in ranked] == sorted(range(3), key=lambda i: -expected[i])
    assert [r["score"] for r in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert [r["reranker_score"] for r in ranked] == pytest.approx([ours[r["corpus_id"]] for r in ranked], abs=1e-5)
    # weight 1: the first stage's order; weight 0: ours
    assert [r["corpus_id"] for r in reranker.rank("what causes colds?", documents, first_stage_scores=first,
                                                  first_stage_weight=1.0)] == [1, 2, 0]
    alone = reranker.rank("what causes colds?", documents)
    assert [r["corpus_id"] for r in reranker.rank("what causes colds?", documents, first_stage_scores=first,
                                                  first_stage_weight=0.0)] == [r["corpus_id"] for r in alone]
    for bad, match in (([1.0, 2.0], "2 values for 3"), ([1.0, float("nan"), 2.0], "finite"),
                       ([1.0, "x", 2.0], "finite")):
        with pytest.raises(ValueError, match=match):
            reranker.rank("q", documents, first_stage_scores=bad)
    with pytest.raises(ValueError, match="first_stage_weight"):
        reranker.rank("q", documents, first_stage_scores=first, first_stage_weight=1.5)


def test_default_width_applies_to_every_call(llama_dir):
    compressed = MatryoshkaReranker(llama_dir, start_layer=2, compress_layers=[2], compress_ratio=4)
    plain = MatryoshkaReranker(llama_dir, start_layer=2)
    assert compressed.compute_score(PAIRS, cutoff_layers=4) == pytest.approx(
        plain.compute_score(PAIRS, cutoff_layers=4, compress_layers=[2], compress_ratio=4), abs=1e-6)
    assert compressed.compute_score(PAIRS, cutoff_layers=4, compress_ratio=1) == pytest.approx(
        plain.compute_score(PAIRS, cutoff_layers=4), abs=1e-6)


def test_saved_format_is_used_and_a_different_one_refused(llama_dir, tmp_path):
    adapter = tmp_path / "adapter"
    base = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
    get_peft_model(base, LoraConfig(r=2, target_modules=target_pattern(["q_proj"]))).save_pretrained(adapter)
    InputFormat("Is B relevant to A?", 8, 24).save(adapter)
    reranker = MatryoshkaReranker(llama_dir, start_layer=2, peft_path=adapter)
    assert reranker.input_format == InputFormat("Is B relevant to A?", 8, 24)
    with pytest.raises(InputFormatError, match="different input format"):
        MatryoshkaReranker(llama_dir, start_layer=2, peft_path=adapter, input_format=InputFormat())


def test_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MatryoshkaReranker(tmp_path / "nope")


def test_a_folder_without_tokenizer_or_config_is_named(llama_dir, tmp_path):
    """transformers asked to install sentencepiece or tiktoken for either folder."""
    import shutil

    from matryoshka_reranker.core.errors import InputError

    weights = tmp_path / "weights-only"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, weights / name)
    with pytest.raises(InputError, match="weights-only has no tokenizer"):
        MatryoshkaReranker(weights, start_layer=2)
    with pytest.raises(InputError, match="not a model folder .no config.json"):
        MatryoshkaReranker(tmp_path, start_layer=2)


def test_peft_adapters_change_scores_and_reload(llama_dir, tmp_path):
    base = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_pattern(["q_proj", "v_proj", "score_heads"]),
                                                 init_lora_weights=False))
    trained = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert any("score_heads.4" in n for n in trained) and any("q_proj" in n for n in trained)
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = MatryoshkaReranker(llama_dir, start_layer=2).compute_score(PAIRS, cutoff_layers=4)
    adapted = MatryoshkaReranker(llama_dir, start_layer=2, peft_path=tmp_path / "adapter").compute_score(PAIRS, cutoff_layers=4)
    assert adapted != pytest.approx(plain, abs=1e-4)
    with torch.no_grad():
        from transformers import AutoTokenizer

        from matryoshka_reranker.model.inputs import PairEncoder

        encoder = PairEncoder(AutoTokenizer.from_pretrained(llama_dir))
        batch = encoder.collate([encoder.encode(q, p) for q, p in PAIRS])
        expected = peft_model(**batch, cutoff_layers=4)[0]
    assert adapted == pytest.approx(expected.tolist(), abs=1e-5)



def test_adapters_bring_the_layer_layout_they_were_trained_with(llama_dir, tmp_path):
    """A raw base model plus adapters trained with start_layer 1: the reranker takes the recorded layout (it
    took 4 and dropped the exit-1..3 heads silently); a model with another layout is refused, naming the fix."""
    from matryoshka_reranker.model.adapters import TRAINING_LOG, merge_adapters

    base = MatryoshkaModel.from_pretrained(llama_dir, start_layer=1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_pattern(["q_proj", "score_heads"]),
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / TRAINING_LOG).write_text(json.dumps({"exit_layers": [1, 2, 3, 4]}))
    reranker = MatryoshkaReranker(llama_dir, peft_path=tmp_path / "adapter")
    assert reranker.model.exit_layers == [1, 2, 3, 4]
    assert len(reranker.compute_score(PAIRS, cutoff_layers=[1, 4])) == 2
    with pytest.raises(ValueError, match=r"trained with score heads at exits \[1, 2, 3, 4\].*start_layer=1"):
        merge_adapters(MatryoshkaModel.from_pretrained(llama_dir, start_layer=2), [tmp_path / "adapter"])
    with pytest.raises(ValueError, match="start_layer=1"):
        MatryoshkaReranker(llama_dir, peft_path=tmp_path / "adapter", start_layer=2)


def test_an_explicit_width_other_than_the_token_adapters_is_warned_about(llama_dir, tmp_path, caplog):
    """A token adapter recorded as trained at ratio 2 (layers [2]) sets the default width; asked for another, the
    reranker scores as asked and says that this is not the width the adapter was trained for."""
    from matryoshka_reranker.model.adapters import TRAINING_LOG, trained_compression

    base = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_pattern(["q_proj"]),
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "token")
    log = {"exit_layers": [2, 3, 4], "compression": {"layers": [2], "ratios": [2], "sample": False}}
    (tmp_path / "token" / TRAINING_LOG).write_text(json.dumps(log))
    assert trained_compression(tmp_path / "token") == ((2,), 2)
    reranker = MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token")
    assert (reranker.compress_layers, reranker.compress_ratio) == ((2,), 2)
    assert "trained" not in caplog.text
    with caplog.at_level("WARNING"):
        full = MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token", compress_ratio=1)
    assert full.compress_ratio == 1 and "trained to score at ratio 2" in caplog.text
    for sampled in ({"layers": [2], "ratios": [1, 2], "sample": True}, {"layers": [], "ratios": [1], "sample": True}):
        (tmp_path / "token" / TRAINING_LOG).write_text(json.dumps({**log, "compression": sampled}))
        assert trained_compression(tmp_path / "token") is None  # self-distillation: every width; a layer adapter
        assert MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token").compress_ratio == 1


def test_another_ratio_than_the_token_adapters_compresses_at_its_layers(llama_dir, tmp_path, caplog):
    """A ratio-2 token adapter (layers [2]) asked for compress_ratio=4 without compress_layers (``matryoshka score
    --compress-ratio 4``): it scored with no compression layers, i.e. at full width, while the warning said
    "ratio 4". The ratio asked is applied at the adapter's layers; the same layers in another order (or repeated)
    are the adapter's width, not a warning."""
    from matryoshka_reranker.model.adapters import TRAINING_LOG

    base = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_pattern(["q_proj"]),
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "token")
    log = {"exit_layers": [2, 3, 4], "compression": {"layers": [2, 3], "ratios": [2], "sample": False}}
    (tmp_path / "token" / TRAINING_LOG).write_text(json.dumps(log))
    with caplog.at_level("WARNING"):
        four = MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token", compress_ratio=4)
    assert (four.compress_layers, four.compress_ratio) == ((2, 3), 4) and "trained to score at ratio 2" in caplog.text
    full = four.compute_score(PAIRS, cutoff_layers=4, compress_ratio=1)
    assert four.compute_score(PAIRS, cutoff_layers=4) != pytest.approx(full, abs=1e-4)  # compressed, as asked
    caplog.clear()
    with caplog.at_level("WARNING"):
        MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token", compress_layers=[3, 2, 3])
    assert "trained to score" not in caplog.text
    # recorded layers this model does not have (a deeper model's adapter): the error says where they came from
    (tmp_path / "token" / TRAINING_LOG).write_text(json.dumps({**log, "compression": {**log["compression"],
                                                                                     "layers": [9]}}))
    with pytest.raises(ValueError, match=r"outside \[1, 3\].*the token adapter was trained at"):
        MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token")
    assert MatryoshkaReranker(llama_dir, peft_path=tmp_path / "token", compress_ratio=1).compress_layers == ()


def test_a_ratio_without_compression_layers_is_refused(llama_dir):
    """compress_ratio=2 with no compress_layers (and no token adapter to take them from) compressed nothing and
    scored at full width, silently; at construction and per call."""
    with pytest.raises(ValueError, match="compress_ratio=2 needs compress_layers"):
        MatryoshkaReranker(llama_dir, start_layer=2, compress_ratio=2)
    reranker = MatryoshkaReranker(llama_dir, start_layer=2)
    with pytest.raises(ValueError, match="compress_ratio=2 needs compress_layers"):
        reranker.compute_score(PAIRS, compress_ratio=2)
    assert len(reranker.compute_score(PAIRS, compress_ratio=2, compress_layers=[2])) == len(PAIRS)


def test_cli_score(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": q, "passage": p}) for q, p in PAIRS) + "\n")
    result = CliRunner().invoke(app, ["score", "--model", str(llama_dir), "--pairs", str(pairs),
                                      "--start-layer", "2", "--cutoff-layers", "2", "4"])  # as documented
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    expected = MatryoshkaReranker(llama_dir, start_layer=2).compute_score(PAIRS, cutoff_layers=[2, 4])
    assert [r["4"] for r in rows] == pytest.approx(expected[1], abs=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    result = CliRunner().invoke(app, ["score", "--model", str(llama_dir), "--pairs", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not cpp_compiler(), reason="Inductor finds no C++ compiler (the fallback is tested below)")
def test_compiled_layers_score_as_eager_at_every_width(llama_dir):
    """``compile=True``: the same scores for every exit, ratio and batch shape (batch 1 included,
    which PyTorch compiles apart), from one reranker whose layers run through torch.compile, and
    no request recompiles after the warm-up (an error if one does)."""
    import torch._dynamo

    eager = MatryoshkaReranker(llama_dir, start_layer=2, batch_size=2)
    compiled = MatryoshkaReranker(llama_dir, start_layer=2, batch_size=2, compile=True)
    assert compiled.compiled and all(layer._compiled_call_impl is not None for layer in compiled.model.decoder.layers)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kwargs in (dict(cutoff_layers=[2, 4]), dict(cutoff_layers=[4], compress_layers=[2], compress_ratio=2)):
            got, want = compiled.compute_score(PAIRS, **kwargs), eager.compute_score(PAIRS, **kwargs)
            assert torch.tensor(got) == pytest.approx(torch.tensor(want), abs=1e-4)
        assert compiled.compute_score(PAIRS[2], cutoff_layers=4) == pytest.approx(
            eager.compute_score(PAIRS[2], cutoff_layers=4), abs=1e-4)


def test_compile_failure_falls_back_to_eager(llama_dir, monkeypatch, caplog):
    """No working compiler (here: torch.compile raising as Inductor does without a C++ toolchain):
    the reranker warns, keeps the eager layers and scores exactly as an eager one."""
    def broken_compile(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        self._compiled_call_impl = fail
    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    reranker = MatryoshkaReranker(llama_dir, start_layer=2, batch_size=2, compile=True)
    assert reranker.compiled is False
    assert all(layer._compiled_call_impl is None for layer in reranker.model.decoder.layers)
    assert "torch.compile failed here, scoring stays eager: InductorError: no C++ compiler found" in caplog.text
    eager = MatryoshkaReranker(llama_dir, start_layer=2, batch_size=2)
    assert reranker.compute_score(PAIRS, cutoff_layers=[2, 4]) == eager.compute_score(PAIRS, cutoff_layers=[2, 4])


def test_fusion_uses_raw_scores_when_normalize_is_asked():
    """``rank(normalize=True, first_stage_scores=...)`` fuses the raw scores (as the server does) and reports
    the normalized ones: min-max of a sigmoid is not min-max of the logits, and here the order would flip."""
    import math

    from matryoshka_reranker.serving.ranking import fuse_scores, rank_documents

    raw, first = [4.0, 5.0, -5.0], [1.0, 0.92, 0.0]

    def sigmoid(values):
        return [1 / (1 + math.exp(-v)) for v in values]

    ranked = rank_documents(lambda pairs: raw, "q", ["a", "b", "c"], first_stage_scores=first, normalize=sigmoid)
    fused = fuse_scores(raw, first)
    assert [r["corpus_id"] for r in ranked] == [1, 0, 2]  # fused sigmoids would put document 0 first
    assert sorted(range(3), key=lambda i: -fuse_scores(sigmoid(raw), first)[i])[0] == 0
    assert [r["score"] for r in ranked] == pytest.approx([fused[1], fused[0], fused[2]])
    assert [r["reranker_score"] for r in ranked] == pytest.approx([sigmoid(raw)[i] for i in (1, 0, 2)])
    alone = rank_documents(lambda pairs: raw, "q", ["a", "b", "c"], normalize=sigmoid)
    assert [r["score"] for r in alone] == pytest.approx([sigmoid(raw)[i] for i in (1, 0, 2)])


def test_first_stage_scores_and_top_k_from_numpy():
    """Scores from numpy (bm25s gives float32, a counter int64) are numbers like Python's; an int beyond float's
    range is refused as not finite (a ValueError: the server's 422), not an OverflowError (a 500)."""
    import numpy as np

    from matryoshka_reranker.serving.ranking import fuse_scores, rank_documents

    raw, first = [0.1, 0.9, 0.5], [3.0, 1.0, 2.0]
    want = rank_documents(lambda pairs: raw, "q", ["a", "b", "c"], top_k=2, first_stage_scores=first)
    for typed in (np.array(first, dtype=np.float32), np.array(first, dtype=np.int64), np.array(first)):
        assert fuse_scores(raw, typed) == pytest.approx(fuse_scores(raw, first))
        got = rank_documents(lambda pairs: raw, "q", ["a", "b", "c"], top_k=np.int64(2), first_stage_scores=typed)
        assert got == want  # these values fuse exactly
    for bad in ([10**400, 1, 2], [np.float32("nan"), 1, 2], [np.True_, 1, 2]):
        with pytest.raises(ValueError, match="finite"):
            fuse_scores(raw, bad)


def test_rank_of_no_documents_is_an_empty_list_as_in_sentence_transformers():
    """``CrossEncoder.rank(query, [])`` returns ``[]`` (a first stage that found nothing); ``rank`` raised
    ValueError. The model is not called; first-stage scores given for documents that are not there still fail."""
    from matryoshka_reranker.serving.ranking import rank_documents

    def never(pairs):
        raise AssertionError("scored no documents")

    assert rank_documents(never, "q", []) == []
    assert rank_documents(never, "q", [], top_k=3, return_documents=True, first_stage_scores=[]) == []
    with pytest.raises(ValueError, match="first_stage_scores has 1 values"):
        rank_documents(never, "q", [], first_stage_scores=[1.0])


def test_rank_ties_keep_the_documents_order():
    """Equal scores keep the order the documents were given in (a stable sort), with and without top_k and
    first-stage fusion, so a ranking is deterministic and a first stage's order breaks the re-ranker's ties."""
    from matryoshka_reranker.serving.ranking import rank_documents

    raw = [0.5, 2.0, 0.5, 2.0, 0.5]
    documents = ["a", "b", "c", "d", "e"]
    ranked = rank_documents(lambda pairs: raw, "q", documents, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == [1, 3, 0, 2, 4]
    assert [r["text"] for r in ranked] == ["b", "d", "a", "c", "e"]
    assert [r["corpus_id"] for r in rank_documents(lambda pairs: raw, "q", documents, top_k=3)] == [1, 3, 0]
    flat = rank_documents(lambda pairs: [1.0] * 5, "q", documents, first_stage_scores=[7.0] * 5)
    assert [r["corpus_id"] for r in flat] == [0, 1, 2, 3, 4]
    assert [r["score"] for r in flat] == [0.5] * 5  # a constant list carries no order: min-max maps it to 0.5
