"""OnnxReranker: the compute_score contract, provider choice, and refusing folders that do not match."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from matryoshka_reranker import OnnxReranker
from matryoshka_reranker.core.atomic import sha256_file
from matryoshka_reranker.model.inputs import InputFormat
from matryoshka_reranker.pipeline.export import ExportOptions, export_models
from matryoshka_reranker.serving import onnx_runtime
from matryoshka_reranker.serving.artifacts import ExitNotExported, ModelIntegrityError, read_manifest
from matryoshka_reranker.serving.onnx_runtime import pick_providers
from matryoshka_reranker.serving.reranker import MatryoshkaReranker

pytestmark = pytest.mark.slow  # the module fixture runs one torch.onnx.export

FORMAT = InputFormat(query_max_len=24, passage_max_len=24)
PAIRS = [
    ("capital of France", "Paris is the capital of France."),
    ("what causes the common cold?", "Rhinoviruses cause most colds in adults and children, spread by hands."),
    ("q", "x"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("ort") / "onnx"
    options = ExportOptions(start_layer=1, input_format=FORMAT)
    export_models(llama_dir, out, [3], [1], options=options)
    return out / "ratio-1"  # exit 3's graph (the deepest, so the default) beside the weights


@pytest.fixture
def folder(exported, tmp_path):
    """A private copy to corrupt."""
    return shutil.copytree(exported, tmp_path / "model")


def test_compute_score_matches_pytorch_and_restores_order(exported, llama_dir):
    reranker = OnnxReranker(exported, threads=1)
    assert reranker.exit_layer == 3 and reranker.compress_ratio == 1
    assert reranker.providers == ["CPUExecutionProvider"]
    assert reranker.session.get_session_options().intra_op_num_threads == 1
    scores = reranker.compute_score(PAIRS, batch_size=2)
    expected = MatryoshkaReranker(llama_dir, start_layer=1, input_format=FORMAT).compute_score(PAIRS, cutoff_layers=[3])
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
    assert reranker.compute_score(PAIRS[::-1], batch_size=1) == pytest.approx(scores[::-1], abs=1e-5)
    single = reranker.compute_score(PAIRS[1])
    assert isinstance(single, float) and single == pytest.approx(scores[1], abs=1e-5)
    normalized = reranker.compute_score(PAIRS, normalize=True)
    assert normalized == pytest.approx([1 / (1 + math.exp(-s)) for s in scores], abs=1e-6)


def test_compute_score_rejects_bad_input(exported):
    reranker = OnnxReranker(exported)
    with pytest.raises(ValueError, match="at least one"):
        reranker.compute_score([])
    with pytest.raises(TypeError, match="pair 1"):
        reranker.compute_score([PAIRS[0], ("only one",)])
    with pytest.raises(ValueError, match="batch_size"):
        reranker.compute_score(PAIRS, batch_size=0)


def test_truncated_onnx_is_refused(folder):
    data = (folder / "exit-03.onnx").read_bytes()
    (folder / "exit-03.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelIntegrityError, match=r"exit-03\.onnx: sha256 .* does not match the manifest"):
        OnnxReranker(folder)
    import os

    os.utime(folder / "exit-03.onnx", ns=(1, 1))  # a new mtime: the hash cache must not hide the change
    # Even with a manifest rewritten to the truncated file's hash, ORT's load error is reported clearly.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["exit-03.onnx"] = sha256_file(folder / "exit-03.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="ONNX Runtime cannot load the model"):
        OnnxReranker(folder)


def test_changed_weights_are_refused(folder):
    weights = folder / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"weights\.bin: sha256"):
        OnnxReranker(folder)
    OnnxReranker(folder, verify=False)  # loads (wrong weights): verification is what catches it


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=4), "format_version 4; .* reads up to 3"),
        (lambda m: m.update(format_version=2), "older matryoshka-reranker"),
        (lambda m: m.update(format_version=1), "older matryoshka-reranker"),
        (lambda m: m.pop("format_version"), "missing or invalid format_version"),
        (lambda m: m["files"].pop("exit-03.onnx"), "must list every file"),
        (lambda m: m.update(models=[]), "must list the folder's models"),
        (lambda m: m["files"].update({"extra.bin": "0" * 64}), r"extra\.bin is listed but missing"),
        (lambda m: m["files"].update({"../escape": "0" * 64}), "outside"),
    ],
)
def test_bad_manifests_are_refused(folder, edit, message):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=message):
        read_manifest(folder)


def test_files_the_manifest_does_not_list_are_refused(folder):
    """A dropped-in tokenizer file would change how text is tokenized: refused, naming the file."""
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<pad>"}')
    with pytest.raises(ModelIntegrityError, match=r"special_tokens_map\.json is not listed in the manifest"):
        OnnxReranker(folder)


def test_all_exits_model_scores_and_calibrates_the_exit_asked_for(folder):
    """compute_score(normalize=True) of the all-exits graph is the exit's calibrated probability, as from the exit's
    own graph (it was a plain sigmoid: the all-exits entry carries no calibration); an exit it lacks is refused."""
    manifest = json.loads((folder / "manifest.json").read_text())
    exit_model = next(m for m in manifest["models"] if m["kind"] == "exit")
    exit_model["calibration"] = {"method": "platt", "a": 2.0, "b": -1.0, "pairs": 5, "positives": 2}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    single = OnnxReranker(folder, 3)
    calibrated = single.compute_score(PAIRS, normalize=True)
    raw = single.compute_score(PAIRS)
    assert calibrated == pytest.approx([1 / (1 + math.exp(-(2 * s - 1))) for s in raw], abs=1e-6)
    both = OnnxReranker(folder, all_exits=True)
    assert both.exit_layer == 3 and both.compute_score(PAIRS, normalize=True) == pytest.approx(calibrated, abs=1e-5)
    assert OnnxReranker(folder, 3, all_exits=True).rank(PAIRS[0][0], [p for _, p in PAIRS], normalize=True)[0][
        "score"] == pytest.approx(max(single.compute_score([(PAIRS[0][0], p) for _, p in PAIRS], normalize=True)))
    with pytest.raises(ExitNotExported, match=r"no exit layer 7 .* its exits: \[3\]"):
        OnnxReranker(folder, 7, all_exits=True)  # was ignored: the deepest exit's scores under exit 7's name


def test_rank_and_flagembedding_pair(exported):
    reranker = OnnxReranker(exported)
    documents = [p for _, p in PAIRS]
    scores = reranker.compute_score([("capital of France", d) for d in documents])
    ranked = reranker.rank("capital of France", documents, top_k=2, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == sorted(range(3), key=lambda i: -scores[i])[:2]
    assert ranked[0]["text"] == documents[ranked[0]["corpus_id"]]
    assert reranker.compute_score(["capital of France", documents[0]]) == pytest.approx(scores[0], abs=1e-5)
    # fused with a first stage: weight 1 is the first stage's order, and the model's scores come along
    fused = reranker.rank("capital of France", documents, first_stage_scores=[1.0, 0.0, 2.0], first_stage_weight=1.0)
    assert [r["corpus_id"] for r in fused] == [2, 0, 1]
    assert [r["reranker_score"] for r in fused] == pytest.approx([scores[2], scores[0], scores[1]], abs=1e-5)


def test_serving_needs_neither_torch_nor_transformers(exported):
    """A serving box installs onnxruntime + tokenizers + numpy: OnnxReranker must work with torch unimportable."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from matryoshka_reranker import OnnxReranker\n"
        f"r = OnnxReranker({str(exported)!r})\n"
        "print(r.compute_score([('capital of France', 'Paris is the capital of France.')])[0])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = OnnxReranker(exported).compute_score([PAIRS[0]])[0]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def test_missing_manifest_is_refused(folder):
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelIntegrityError, match="no manifest.json"):
        OnnxReranker(folder)


def test_provider_choice(monkeypatch):
    monkeypatch.setattr(onnx_runtime, "cuda_works", lambda: False)
    assert pick_providers() == ["CPUExecutionProvider"]  # the CUDA provider is listed without a GPU
    monkeypatch.setattr(onnx_runtime, "cuda_works", lambda: True)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert pick_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not available"):
        pick_providers(["NoSuchExecutionProvider"])
