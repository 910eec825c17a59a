"""Exit specialists: trained on the cut ratio-1 stack, exported as their own folder, served on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from matryoshka_reranker.config import ParamsError, load_params
from matryoshka_reranker.model.adapters import AdapterStackError, adapter_digest, merge_adapters
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.pipeline.export import export_from_params
from matryoshka_reranker.release.registry import expected_artifacts
from matryoshka_reranker.serving.artifacts import read_index
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker
from matryoshka_reranker.serving.server import ModelPool, ServerInputError
from matryoshka_reranker.training.compensation import compensate
from matryoshka_reranker.training.specialist import INDEX, specialize
from matryoshka_reranker.training.trainer import self_distill
from tests.train_fixtures import TRAIN_ROWS, one_thread, tiny_params, write_jsonl  # noqa: F401  (autouse)

PAIRS = [("what causes the common cold", "Rhinoviruses cause most colds in adults and children, spread by hands."),
         ("capital of France", "Paris is the capital of France and its largest city by far."),
         ("capital of France", "Berlin is the capital of Germany.")]
SPECIALIST = {"specialist__exits": [2], "specialist__max_steps": 3, "specialist__save_steps": 3,
              "specialist__train_group_size": 3, "specialist__learning_rate": 0.01, "specialist__warmup_ratio": 0.0,
              "specialist__deepspeed": None, "specialist__bf16_autocast": False,
              "specialist__lora": {"rank": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    tmp_path = tmp_path_factory.mktemp("specialist")
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2, self_distill__save_steps=2,
                         export__calibration_queries=0, paths__specialists=str(tmp_path / "specialists"),
                         paths__onnx=str(tmp_path / "onnx"), **SPECIALIST)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs before the autouse one_thread fixture
    try:
        self_distill(params)
        compensate(params)
        results = specialize(params)
        export_from_params(params)
    finally:
        torch.set_num_threads(threads)
    return params, results


def stack_model(params, exit_layer: int | None = None, specialist: bool = False) -> MatryoshkaModel:
    """The ratio-1 model in PyTorch: base + stack, optionally cut after ``exit_layer`` (+ the specialist)."""
    model = MatryoshkaModel.from_pretrained(params.model.name_or_path, start_layer=1, dtype=torch.float32)
    model = merge_adapters(model, params.adapter_stack(1)).eval()
    if exit_layer is not None:
        model = model.truncate(exit_layer)
    if specialist:
        model = merge_adapters(model, [params.specialist_dir(exit_layer)], merged=params.adapter_stack(1)).eval()
    return model


def torch_scores(params, model, exit_layer: int) -> np.ndarray:
    encoder = params.model.input_format.encoder(AutoTokenizer.from_pretrained(params.model.name_or_path))
    batch = encoder.collate(encoder.encode_many(PAIRS))
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], cutoff_layers=[exit_layer])[0].numpy()


def test_truncate_keeps_the_exit_scores_and_drops_the_deeper_layers(trained):
    params, _ = trained
    full = torch_scores(params, stack_model(params), 2)
    cut = stack_model(params, 2)
    assert cut.num_layers == 2 and cut.exit_layers == [1, 2] and sorted(cut.score_heads) == ["1", "2"]
    np.testing.assert_allclose(torch_scores(params, cut, 2), full, atol=1e-6)
    with pytest.raises(ValueError, match="not an exit below the deepest"):
        stack_model(params, 4)


def test_the_specialist_trains_at_its_exit_on_the_stack_it_is_merged_onto(trained):
    params, results = trained
    assert set(results) == {2} and results[2]["steps"] == 3 and results[2]["cut_max_abs_diff"] < 1e-5
    folder = params.specialist_dir(2)
    log = json.loads((folder / "training_log.json").read_text())
    assert log["exit_layers"] == [1, 2] and log["train_method"] == "teacher"
    assert log["trained_on"] == [adapter_digest(p) for p in params.adapter_stack(1)]
    index = json.loads((Path(params.paths.specialists) / INDEX).read_text())
    assert index["exits"] == [2] and index["teacher_exit"] == 4 and index["group_size"] == 3
    # it learned something: its exit-2 scores are not the stack's
    before = torch_scores(params, stack_model(params, 2), 2)
    after = torch_scores(params, stack_model(params, 2, specialist=True), 2)
    assert np.abs(after - before).max() > 1e-3
    # and it refuses a stack it was not trained on (ratio 2's: the token adapter on top)
    model = MatryoshkaModel.from_pretrained(params.model.name_or_path, start_layer=1, dtype=torch.float32)
    with pytest.raises(AdapterStackError):
        merge_adapters(model, [*params.adapter_stack(2), folder])


def test_the_export_writes_the_specialist_as_its_own_folder(trained):
    params, _ = trained
    configs = {c.name: c for c in read_index(params.paths.onnx)}
    special = configs["exit-02-ratio-1-specialist"]
    assert special.variant == "specialist" and (special.exit_layer, special.ratio) == (2, 1)
    assert special.path.name == "exit-02-ratio-1-specialist" and special.path != configs["exit-02-ratio-1"].path
    manifest = json.loads((special.path / "manifest.json").read_text())
    assert manifest["variant"] == "specialist" and manifest["num_layers"] == 2
    assert {m["name"] for m in manifest["models"]} == {"exit-02-ratio-1-specialist", "all-exits-ratio-1"}
    assert [a["path"] for a in manifest["adapters"]] == [*map(str, params.adapter_stack(1)), str(params.specialist_dir(2))]
    assert "Exit specialist" in (special.path / "README.md").read_text()
    onnx = OnnxReranker(special.path, 2).compute_score(PAIRS)
    np.testing.assert_allclose(onnx, torch_scores(params, stack_model(params, 2, specialist=True), 2), atol=1e-4)
    shared = OnnxReranker(configs["exit-02-ratio-1"].path, 2).compute_score(PAIRS)
    assert np.abs(np.array(onnx) - np.array(shared)).max() > 1e-3


def test_the_server_serves_the_specialist_only_when_asked(trained):
    params, _ = trained
    plain = ModelPool(params.paths.onnx)
    assert all(c.variant is None for c in plain.configs.values())
    special = ModelPool(params.paths.onnx, variant="specialist")
    assert special.configs[2, 1].variant == "specialist" and special.configs[4, 1].variant is None
    assert special.configs[2, 2] == plain.configs[2, 2]
    # a specialist is ratio 1 with weights of its own: never the ratio-1 folder's memory-mapped ones
    expected = OnnxReranker(special.configs[2, 1].path, 2).compute_score(PAIRS)
    special.get((4, 1))
    np.testing.assert_allclose(special.get((2, 1)).compute_score(PAIRS), expected, atol=1e-6)
    assert {d["name"]: d["variant"] for d in special.describe()}["exit-02-ratio-1-specialist"] == "specialist"
    with pytest.raises(ServerInputError, match="no 'int8' models"):
        ModelPool(params.paths.onnx, variant="int8")


def test_a_release_declares_the_specialist_as_an_artifact(trained):
    params, _ = trained
    artifacts = expected_artifacts(params)
    entry = artifacts["exit-02-ratio-1-specialist"]
    assert entry["path"].endswith("onnx/exit-02-ratio-1-specialist") and entry["meta"]["variant"] == "specialist"
    assert "exit-02-ratio-1" in artifacts and "exit-04-ratio-1-specialist" not in artifacts


def test_no_exits_writes_an_empty_stage_output(trained, tmp_path):
    params, _ = trained
    empty = params.model_copy(update={
        "specialist": params.specialist.model_copy(update={"exits": []}),
        "paths": params.paths.model_copy(update={"specialists": str(tmp_path / "none")})})
    assert specialize(empty) == {}
    assert json.loads((tmp_path / "none" / INDEX).read_text()) == {"exits": []}


@pytest.mark.parametrize("override, message", [
    ("specialist.exits=[12]", "not in export.exit_layers"),
    ("specialist.layer_weights={8: 1.0}", "leave it empty"),
    ("specialist.train_method=distill_same_layer", "same_layer"),
    ("specialist.train_method=distill_fix_layer_teacher", "fix_layer would teach exit k"),
    ("specialist.lora.layer_ranks={16: 64}", "has 8 layers"),
])
def test_settings_that_cannot_make_a_specialist_fail_at_parse(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["specialist.exits=[8]", override])


def test_a_specialist_needs_the_ratio_1_export():
    with pytest.raises(ParamsError, match="add 1 to export.ratios"):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml",
                    ["specialist.exits=[8]", "export.ratios=[2]"])
