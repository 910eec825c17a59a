"""Factorized compensation: layer and token adapters train on the right stack and combine at inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from matryoshka_reranker.model.adapters import adapter_digest
from matryoshka_reranker.model.inputs import InputFormat
from matryoshka_reranker.serving.reranker import MatryoshkaReranker
from matryoshka_reranker.training.compensation import compensate
from matryoshka_reranker.training.trainer import self_distill
from tests.train_fixtures import TRAIN_ROWS, one_thread, tiny_params, write_jsonl  # noqa: F401  (autouse)

PAIRS = [("what causes the common cold", "Rhinoviruses cause most colds in adults and children, spread by hands."),
         ("capital of France", "Paris is the capital of France and its largest city by far.")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    tmp_path = tmp_path_factory.mktemp("compensation")
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2, self_distill__save_steps=2,
                         compensation__token_ratios=[2, 3], compression__ratios=[1, 2, 3])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs before the autouse one_thread fixture
    try:
        self_distill(params)
        results = compensate(params)
    finally:
        torch.set_num_threads(threads)
    return params, results


def scores(reranker, ratio) -> list[float]:
    """Exit-2 then exit-4 scores of PAIRS, flattened."""
    compress = dict(compress_layers=[2], compress_ratio=ratio) if ratio > 1 else {}
    return [s for layer in reranker.compute_score(PAIRS, cutoff_layers=[2, 4], **compress) for s in layer]


def test_adapters_train_on_the_stack_they_are_merged_onto(trained):
    params, results = trained
    assert set(results) == {"layer", "token-ratio-2", "token-ratio-3"}
    root = Path(params.paths.compensation)
    for name in results:
        assert (root / name / "adapter_model.safetensors").exists()
        log = json.loads((root / name / "training_log.json").read_text())
        assert log["steps"] == 2 and log["stage"] == f"compensation_{name}"
        ratio = int(name.removeprefix("token-ratio-")) if name.startswith("token") else 1
        assert log["compression"] == ({"layers": list(params.compression.layers), "ratios": [ratio], "sample": False}
                                      if ratio > 1 else {"layers": [], "ratios": [1], "sample": True})
        below = [params.paths.self_distill] + ([params.layer_adapter_dir()] if ratio > 1 else [])
        assert log["trained_on"] == [adapter_digest(p) for p in below]  # the stack it is merged onto


def test_pipeline_api_picks_the_token_adapter_for_the_ratio(trained):
    params, _ = trained
    root = Path(params.paths.compensation)
    for ratio in (1, 2, 3):
        pipeline = MatryoshkaReranker.from_pipeline(params, ratio=ratio)
        stack = [params.paths.self_distill, root / "layer"] + ([root / f"token-ratio-{ratio}"] if ratio > 1 else [])
        explicit = MatryoshkaReranker(params.model.name_or_path, peft_path=stack, start_layer=1)  # format from adapters
        assert explicit.input_format == params.model.input_format
        assert scores(pipeline, ratio) == pytest.approx(scores(explicit, ratio), abs=1e-6)
        # from_pipeline scores at the adapters' width by default
        assert (pipeline.compress_layers, pipeline.compress_ratio) == ((tuple(params.compression.layers), ratio)
                                                                       if ratio > 1 else ((), 1))
        default = [s for layer in pipeline.compute_score(PAIRS, cutoff_layers=[2, 4]) for s in layer]
        assert default == pytest.approx(scores(pipeline, ratio), abs=1e-6)
        # ... and so does the explicit form: a token adapter records the width it was trained at (it scored at
        # ratio 1 unless compress_layers / compress_ratio were given, a model it was never trained as)
        assert (explicit.compress_layers, explicit.compress_ratio) == (pipeline.compress_layers, pipeline.compress_ratio)
        explicit_default = [s for layer in explicit.compute_score(PAIRS, cutoff_layers=[2, 4]) for s in layer]
        assert explicit_default == pytest.approx(default, abs=1e-6)
    # Each adapter changes the model: dropping the token adapter changes compressed scores.
    without_token = MatryoshkaReranker.from_pipeline(params, ratio=1)
    with_token = MatryoshkaReranker.from_pipeline(params, ratio=2)
    assert scores(with_token, 2)[2:] != pytest.approx(scores(without_token, 2)[2:], abs=1e-6)  # exit 4
    with pytest.raises(FileNotFoundError, match=r"token-ratio-4.*token-ratio-2"):
        MatryoshkaReranker.from_pipeline(params, ratio=4)


def test_a_ratio_dropped_from_the_config_loses_its_adapter(trained, tmp_path):
    params, _ = trained
    shutil.copytree(Path(params.paths.compensation).parent, tmp_path / "copy")
    paths = {k: v.replace(str(Path(params.paths.compensation).parent), str(tmp_path / "copy"))
             for k, v in params.paths.model_dump().items()}
    fewer = params.model_copy(update={
        "compensation": params.compensation.model_copy(update={"token_ratios": [2]}),
        "paths": params.paths.model_copy(update=paths)})
    compensate(fewer, only=["token-ratio-2"])
    assert sorted(p.name for p in Path(fewer.paths.compensation).iterdir()) == ["layer", "token-ratio-2"]
    with pytest.raises(ValueError, match="unknown compensation adapter"):
        compensate(fewer, only=["token-ratio-9"])


def test_a_token_adapter_trained_on_another_layer_adapter_is_refused(trained, tmp_path):
    """A new layer adapter beside token adapters trained on the old one (``compensate --only layer``, or a
    run that stopped half way) is not merged silently: the stack is refused until they are trained again."""
    from matryoshka_reranker.model.adapters import AdapterStackError

    params, _ = trained
    shutil.copytree(Path(params.paths.compensation).parent, tmp_path / "copy")
    paths = {k: v.replace(str(Path(params.paths.compensation).parent), str(tmp_path / "copy"))
             for k, v in params.paths.model_dump().items()}
    layer = params.compensation.layer.model_copy(update={"seed": 7})
    copy = params.model_copy(update={"compensation": params.compensation.model_copy(update={"layer": layer}),
                                     "paths": params.paths.model_copy(update=paths)})
    compensate(copy, only=["layer"])
    MatryoshkaReranker.from_pipeline(copy, ratio=1)  # self-distillation + the new layer adapter: consistent
    with pytest.raises(AdapterStackError, match="token-ratio-2 was trained on top of other adapter files"):
        MatryoshkaReranker.from_pipeline(copy, ratio=2)
    compensate(copy, only=["token-ratio-2"])
    MatryoshkaReranker.from_pipeline(copy, ratio=2)


def test_compensation_needs_the_self_distillation_adapter(tmp_path, llama_dir):
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    with pytest.raises(FileNotFoundError, match="self-distillation adapter"):
        compensate(tiny_params(tmp_path, llama_dir))


def test_every_trained_adapter_carries_the_input_format(trained):
    params, _ = trained
    root = Path(params.paths.compensation)
    for folder in (Path(params.paths.self_distill), root / "layer", root / "token-ratio-2", root / "token-ratio-3"):
        assert InputFormat.load(folder) == params.model.input_format


@pytest.mark.slow
def test_every_path_produces_identical_input_ids(trained, tmp_path):
    """The input contract: training, teacher, PyTorch scoring (explicit, from_pipeline, CLI), export,
    ONNX scoring and evaluation all turn the same pair into the same token ids."""
    from transformers import AutoTokenizer

    from matryoshka_reranker.pipeline.evaluation import pytorch_scorer
    from matryoshka_reranker.pipeline.export import (
        export_from_params,
        validation_batches,
    )
    from matryoshka_reranker.serving.onnx_runtime import OnnxReranker
    from matryoshka_reranker.training.data import Group, GroupCollator
    from matryoshka_reranker.training.teacher import MatryoshkaTeacher
    from matryoshka_reranker.training.trainer import pair_encoder

    params, _ = trained
    long_pairs = [(q * 5, p * 9) for q, p in PAIRS]  # both budgets bind
    tokenizer = AutoTokenizer.from_pretrained(params.model.name_or_path)
    training = GroupCollator(pair_encoder(params, tokenizer))([Group(q, [p], None) for q, p in long_pairs])
    expected = [row[mask.bool()].tolist() for row, mask in zip(training["input_ids"], training["attention_mask"])]

    def ids(encoder):
        return [encoder.encode(q, p).input_ids for q, p in long_pairs]

    root = Path(params.paths.compensation)
    stack = [params.paths.self_distill, root / "layer"]
    encoders = {
        "from_pipeline": MatryoshkaReranker.from_pipeline(params, ratio=2).encoder,
        "explicit adapters": MatryoshkaReranker(params.model.name_or_path, peft_path=stack, start_layer=1).encoder,
        "teacher (raw model)": MatryoshkaTeacher(params.teacher.model_copy(update={
            "kind": "matryoshka", "name_or_path": params.model.name_or_path}), params.model.input_format).reranker.encoder,
        "evaluation's PyTorch check": pytorch_scorer(params, 1).reranker.encoder,
    }
    for name, encoder in encoders.items():
        assert ids(encoder) == expected, name
    onnx_params = params.model_copy(update={"paths": params.paths.model_copy(update={"onnx": str(tmp_path / "onnx")}),
                                            "export": params.export.model_copy(update={"exit_layers": [2],
                                                                                       "ratios": [1],
                                                                                       "calibration_queries": 0})})
    export_from_params(onnx_params)
    onnx = OnnxReranker(tmp_path / "onnx" / "ratio-1", 2)
    assert onnx.input_format == params.model.input_format
    assert ids(onnx.encoder) == expected, "ONNX serving (tokenizers only)"
    batches = validation_batches(params.model.input_format.encoder(tokenizer))
    assert batches[0]["input_ids"].shape[0] == 5  # export checks parity in the same format


@pytest.mark.slow
def test_same_layer_token_adapter_trains_under_deepspeed(trained, tmp_path):
    """The width objective (the default ``same_layer_mse``) switches PEFT layers off and on inside the step; under DeepSpeed ZeRO-1
    the run completes and the saved adapter changes the compressed scores. (Whether it recovers
    quality is measured on SciFact, README "Quality"; the tiny model here loses almost nothing to
    compression, so there is nothing to recover.)"""
    from matryoshka_reranker.training.data import load_training_file

    params, _ = trained
    root = tmp_path / "copy"
    shutil.copytree(Path(params.paths.compensation).parent, root)
    paths = {k: v.replace(str(Path(params.paths.compensation).parent), str(root))
             for k, v in params.paths.model_dump().items()}
    token = params.compensation.token.model_copy(update={
        "train_method": "same_layer_mse", "deepspeed": str(Path(__file__).parents[1] / "configs/deepspeed/zero1.json"),
        "max_steps": 8, "save_steps": 8, "learning_rate": 0.02})
    ours = params.model_copy(update={
        "compensation": params.compensation.model_copy(update={"token_ratios": [2], "token": token}),
        "paths": params.paths.model_copy(update=paths)})
    stack = [Path(ours.paths.self_distill), Path(ours.paths.compensation) / "layer"]
    pairs = [(e.query, p) for e in load_training_file(ours.paths.teacher_scored) for p in [*e.pos, *e.neg]]

    def distance(token_adapter: bool) -> float:
        full = MatryoshkaReranker(ours.model.name_or_path, peft_path=stack, start_layer=1)
        narrow = MatryoshkaReranker(ours.model.name_or_path, start_layer=1,
                                    peft_path=stack + ([Path(ours.paths.compensation) / "token-ratio-2"] if token_adapter else []))
        a = torch.tensor(full.compute_score(pairs, cutoff_layers=[2, 3, 4]))
        b = torch.tensor(narrow.compute_score(pairs, cutoff_layers=[2, 3, 4], compress_layers=[2], compress_ratio=2))
        return (a - b).abs().mean().item()

    before = distance(False)
    log = compensate(ours, only=["token-ratio-2"])["token-ratio-2"]
    assert log["steps"] == 8 and log["train_method"] == "same_layer_mse" and log["deepspeed"] == token.deepspeed
    assert distance(True) != pytest.approx(before, abs=1e-4)


@pytest.mark.slow
def test_serve_pipeline_serves_the_trained_stack_per_ratio(trained, tmp_path):
    """``matryoshka serve --pipeline params.yaml``: the PyTorch backend over ``from_pipeline`` per ratio
    (a real uvicorn process), scores equal to ``from_pipeline``'s at each exit and ratio."""
    import subprocess
    import sys

    import httpx
    import yaml

    from tests.test_server import free_port, wait_until_healthy

    params, _ = trained
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))  # run where no export lies
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "serve", "--pipeline", "params.yaml",
                                "--ratios", "1", "--ratios", "2", "--layers", "2", "--layers", "4", "--dtype", "float32",
                                "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, tries=1200)  # two merged models to load
        query, texts = PAIRS[0][0], [p for _, p in PAIRS]
        for ratio in (1, 2):
            reranker = MatryoshkaReranker.from_pipeline(params, ratio=ratio, dtype="float32")
            for exit_layer in (2, 4):
                body = {"query": query, "texts": texts, "raw_scores": True, "exit_layer": exit_layer, "ratio": ratio,
                        "truncate": True}  # the passages are over the tiny format's 20 tokens
                response = httpx.post(f"{url}/rerank", json=body)
                assert response.status_code == 200, response.text
                got = {r["index"]: r["score"] for r in response.json()}
                want = reranker.compute_score([(query, t) for t in texts], cutoff_layers=exit_layer)
                assert [got[i] for i in range(len(texts))] == pytest.approx(want, abs=1e-5), (exit_layer, ratio)
        refused = httpx.post(f"{url}/rerank", json={"query": query, "texts": texts, "exit_layer": 3, "truncate": True})
        assert refused.status_code == 422  # only --layers 2 4 are served
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_served_probabilities_use_the_export_calibration_only_for_the_adapters_it_was_made_from(trained, tmp_path,
                                                                                               caplog):
    """``serve --pipeline`` reads Platt (a, b) from ``paths.onnx`` per (exit, ratio), and refuses it (plain
    sigmoid, a warning) for a ratio whose adapters changed since the export: stale calibrations would
    answer with wrong probabilities."""
    from matryoshka_reranker.pipeline.calibration import CalibrationSet
    from matryoshka_reranker.pipeline.export import ExportOptions, export_models
    from matryoshka_reranker.serving.server import export_calibrations

    params, _ = trained
    labelled = CalibrationSet(query_ids=("q1",), pairs=tuple(PAIRS * 2), labels=(1, 0, 0, 1))
    onnx = tmp_path / "onnx"
    export_models(params.model.name_or_path, onnx, [2, 4], [1, 2], params.compression.layers,
                  adapters=params.adapter_stack, options=ExportOptions(start_layer=1, calibration=labelled,
                                                                       input_format=params.model.input_format))
    exported = params.model_copy(update={"paths": params.paths.model_copy(update={"onnx": str(onnx)})})
    calibrations = export_calibrations(exported, [1, 2])
    assert sorted(calibrations) == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert all({"a", "b"} <= set(c) for c in calibrations.values())

    token = tmp_path / "token-ratio-2"  # the ratio-2 token adapter retrained after the export
    shutil.copytree(Path(params.paths.compensation) / "token-ratio-2", token)
    with open(token / "adapter_model.safetensors", "ab") as f:
        f.write(b"retrained")
    compensation = tmp_path / "compensation"
    compensation.mkdir()
    (compensation / "layer").symlink_to(Path(params.paths.compensation) / "layer")
    (compensation / "token-ratio-2").symlink_to(token)
    retrained = exported.model_copy(update={"paths": exported.paths.model_copy(update={"compensation": str(compensation)})})
    assert sorted(export_calibrations(retrained, [1, 2])) == [(2, 1), (4, 1)]
    assert "ratio(s) [2] were exported from other adapters" in caplog.text


def test_check_stack_compares_recorded_digests_and_skips_unrecorded_adapters(tmp_path):
    """Only an adapter with a ``trained_on`` record is checked (PEFT's older ``adapter_model.bin`` counts as its
    weights); an unreadable or foreign training log is no record."""
    import hashlib

    from matryoshka_reranker.model.adapters import AdapterStackError, check_stack

    below, above, foreign = tmp_path / "below", tmp_path / "above", tmp_path / "foreign"
    for folder in (below, above, foreign):
        folder.mkdir()
    (below / "adapter_model.bin").write_bytes(b"old-format weights")
    (foreign / "training_log.json").write_text("[1, 2]")
    digest = hashlib.sha256(b"old-format weights").hexdigest()
    (above / "training_log.json").write_text(json.dumps({"trained_on": [digest]}))
    check_stack([below, above])
    check_stack([foreign, tmp_path / "no-weights-needed"])  # nothing recorded: nothing read
    with pytest.raises(AdapterStackError, match="above was trained on top of other adapter files than the base"):
        check_stack([above])
    (below / "adapter_model.bin").write_bytes(b"retrained weights")
    with pytest.raises(AdapterStackError, match="above was trained on top"):
        check_stack([below, above])
