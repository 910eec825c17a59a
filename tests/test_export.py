"""ONNX export: ORT == PyTorch per (exit, ratio) with adapters merged, layout, manifest, checks, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from matryoshka_reranker import OnnxReranker
from matryoshka_reranker.cli import app
from matryoshka_reranker.core.atomic import sha256_file
from matryoshka_reranker.model import modeling
from matryoshka_reranker.model.adapters import target_pattern
from matryoshka_reranker.model.inputs import InputFormat, InputFormatError
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.pipeline.export import (
    ExportError,
    ExportOptions,
    export_models,
    plan_configs,
)
from matryoshka_reranker.serving.artifacts import ExitNotExported, model_view, parse_config_name
from matryoshka_reranker.serving.onnx_runtime import read_manifest
from matryoshka_reranker.serving.reranker import MatryoshkaReranker
from tests.fixtures import make_tiny_model, make_tokenizer

pytestmark = pytest.mark.slow  # every module fixture runs torch.onnx.export (~5-10 s each)

PAIRS = [
    ("what causes the common cold?", "Rhinoviruses cause most colds in adults and children, spread by hands."),
    ("capital of France", "Paris is the capital of France."),
    ("vitamin D", "Sunlight helps the skin make vitamin D; deficiency is associated with bone loss in adults. " * 3),
    ("q", "x"),
    ("mitochondria", "The mitochondria is the powerhouse of the cell; ATP synthesis happens in its inner membrane."),
]
FORMAT = InputFormat(query_max_len=24, passage_max_len=24)
EXITS, RATIOS, COMPRESS = [2, 3, 4], [1, 2], [2]


def make_adapter(model_dir: Path, path: Path, seed: int) -> Path:
    """A random (init_lora_weights=False) LoRA on every projection and score head, saved with PEFT."""
    model = MatryoshkaModel.from_pretrained(model_dir, start_layer=1)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, bias="none",
                        target_modules=target_pattern(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj", "score_heads"]))
    get_peft_model(model, config).save_pretrained(path)
    return path


def save_tiny(arch: str, path: Path) -> Path:
    tokenizer = make_tokenizer()
    make_tiny_model(arch, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def release(request, tmp_path_factory):
    """A tiny model, two adapters (ratio 1) + a token adapter (ratio 2), exported at exits 2-4, ratios 1-2."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model_dir = save_tiny(request.param, root / "model")
    base = [make_adapter(model_dir, root / "self_distill", 1), make_adapter(model_dir, root / "layer", 2)]
    stacks = {1: base, 2: base + [make_adapter(model_dir, root / "token-ratio-2", 3)]}
    index = export_models(model_dir, root / "onnx", EXITS, RATIOS, COMPRESS, adapters=stacks,
                          options=ExportOptions(start_layer=1, input_format=FORMAT, params_fingerprint="abc"))
    return {"root": root, "model": model_dir, "stacks": stacks, "index": index, "out": root / "onnx"}


def pytorch_scores(release, ratio, exit_layer, pairs, batch_size, adapters=True):
    cache = release.setdefault("rerankers", {})
    if (ratio, adapters) not in cache:
        cache[(ratio, adapters)] = MatryoshkaReranker(release["model"], start_layer=1, input_format=FORMAT,
                                                      peft_path=release["stacks"][ratio] if adapters else None)
    return cache[(ratio, adapters)].compute_score(pairs, cutoff_layers=[exit_layer], compress_layers=COMPRESS,
                                                  compress_ratio=ratio, batch_size=batch_size)


def test_index_lists_every_config(release):
    index = json.loads((release["out"] / "index.json").read_text())
    assert index == release["index"]
    assert index["format_version"] == 3
    assert index["input_format"] == FORMAT.to_dict()
    assert [(e["ratio"], e["path"], e["model_file"], e["exit_layers"]) for e in index["all_exits"]] == [
        (1, "ratio-1", "all-exits.onnx", EXITS), (2, "ratio-2", "all-exits.onnx", EXITS)]
    assert [m["name"] for m in index["models"]] == [
        "exit-02-ratio-1", "exit-03-ratio-1", "exit-04-ratio-1",
        "exit-02-ratio-2", "exit-03-ratio-2", "exit-04-ratio-2"]
    assert index["models"][0] == {"name": "exit-02-ratio-1", "exit_layer": 2, "ratio": 1, "compress_layers": [2],
                                  "variant": None, "path": "ratio-1", "model_file": "exit-02.onnx"}
    assert sorted(p.name for p in release["out"].iterdir()) == ["index.json", "ratio-1", "ratio-2"]


def test_all_exits_model_gives_every_exit_in_one_pass(release):
    for entry in release["index"]["all_exits"]:
        both = OnnxReranker(release["out"] / entry["path"], all_exits=True).score_exits(PAIRS)
        assert sorted(both) == EXITS
        for k in EXITS:
            single = OnnxReranker(release["out"] / f"ratio-{entry['ratio']}", k).compute_score(PAIRS)
            np.testing.assert_allclose(both[k], single, atol=1e-5, rtol=0)


def test_all_exits_model_compute_score_gives_the_exit_asked_for(release, tmp_path):
    """``OnnxReranker(folder, k, all_exits=True).compute_score`` is exit k's scores (and calibration), not the
    deepest exit's: the all-exits graph outputs every exit, and compute_score must pick the one asked for."""
    folder = shutil.copytree(release["out"] / "ratio-1", tmp_path / "ratio-1")
    manifest = json.loads((folder / "manifest.json").read_text())
    for model in manifest["models"]:  # a different Platt fit per exit
        if model["kind"] == "exit":
            model["calibration"] = {"method": "platt", "a": float(model["exit_layer"]), "b": -1.0, "pairs": 5,
                                    "positives": 2}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for k in EXITS:
        both = OnnxReranker(folder, k, all_exits=True)
        single = OnnxReranker(folder, k)
        assert both.exit_layer == k
        np.testing.assert_allclose(both.compute_score(PAIRS), single.compute_score(PAIRS), atol=1e-5, rtol=0)
        np.testing.assert_allclose(both.compute_score(PAIRS, normalize=True),
                                   single.compute_score(PAIRS, normalize=True), atol=1e-5, rtol=0)
    shallow = OnnxReranker(folder, EXITS[0], all_exits=True).compute_score(PAIRS)
    deep = OnnxReranker(folder, EXITS[-1], all_exits=True).compute_score(PAIRS)
    assert np.max(np.abs(np.subtract(shallow, deep))) > 1e-3  # the exits differ, so a wrong pick shows


@pytest.mark.parametrize("batch_size", [1, 5])
def test_ort_scores_equal_pytorch_with_adapters(release, batch_size):
    for entry in release["index"]["models"]:
        reranker = OnnxReranker(release["out"] / entry["path"], entry["exit_layer"])
        assert reranker.exit_layer == entry["exit_layer"] and reranker.compress_ratio == entry["ratio"]
        expected = pytorch_scores(release, entry["ratio"], entry["exit_layer"], PAIRS, batch_size)
        np.testing.assert_allclose(reranker.compute_score(PAIRS, batch_size=batch_size), expected, atol=1e-4,
                                   rtol=0, err_msg=entry["name"])


def test_a_folder_opens_at_its_deepest_exit_or_names_the_exits_it_has(release):
    deepest = OnnxReranker(release["out"] / "ratio-1")
    assert deepest.exit_layer == 4
    with pytest.raises(ExitNotExported, match=r"no exit layer 7 .* its exits: \[2, 3, 4\]"):
        OnnxReranker(release["out"] / "ratio-1", 7)


def test_adapters_and_compression_are_in_the_graph(release):
    """A forgotten merge or a ratio-1 graph under a ratio-2 name would pass a loose check: not this one."""
    with_adapters = OnnxReranker(release["out"] / "ratio-1", 4).compute_score(PAIRS)
    without = pytorch_scores(release, 1, 4, PAIRS, 5, adapters=False)
    assert np.abs(np.array(with_adapters) - without).max() > 1e-3
    ratio_2 = OnnxReranker(release["out"] / "ratio-2", 4).compute_score(PAIRS)
    assert np.abs(np.array(ratio_2) - with_adapters).max() > 1e-3


def test_manifest_describes_the_folder(release):
    for ratio in RATIOS:
        folder = release["out"] / f"ratio-{ratio}"
        manifest = read_manifest(folder)
        assert manifest["format_version"] == 3 and manifest["name"] == f"ratio-{ratio}" and manifest["num_layers"] == 4
        assert manifest["compression"] == {"layers": COMPRESS, "ratio": ratio}
        assert [a["path"] for a in manifest["adapters"]] == [str(p) for p in release["stacks"][ratio]]
        assert all(len(a["sha256"]) == 64 for a in manifest["adapters"])
        assert manifest["opset"] >= 18 and manifest["dtype"] == "float32" and manifest["exporter"] == "dynamo"
        assert manifest["input_format"] == FORMAT.to_dict() and manifest["weights_file"] == "weights.bin"
        assert manifest["tokenizer"]["file"] == "tokenizer.json" and manifest["tokenizer"]["bos_token_id"] == 0
        assert manifest["source_model"] == str(release["model"]) and manifest["params_fingerprint"] == "abc"
        assert [(m["kind"], m["model_file"]) for m in manifest["models"]] == [
            *[("exit", f"exit-0{k}.onnx") for k in EXITS], ("all_exits", "all-exits.onnx")]
        on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == on_disk
        assert {"weights.bin", "tokenizer.json", "README.md", "all-exits.onnx"} <= on_disk
        for name, digest in manifest["files"].items():
            assert sha256_file(folder / name) == digest
        for k in EXITS:
            model = model_view(manifest, k)
            compressed = ratio > 1 and k > 2  # compression at 2 changes exits 3 and 4 only
            assert model["name"] == f"exit-0{k}-ratio-{ratio}" and model["kind"] == "exit" and model["exit_layer"] == k
            assert model["compression"] == {"layers": COMPRESS, "ratio": ratio, "applied_layers": [2] if compressed else []}
            inputs = ["input_ids", "attention_mask"] + (["query_lengths", "prompt_lengths"] if compressed else [])
            assert [i["name"] for i in model["inputs"]] == inputs
            assert model["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch"]}]
            parity = model["parity"]
            assert 0 <= parity["max_abs_diff"] <= parity["tolerance"] == 1e-4 and parity["batch_sizes"] == [1, 5]
            assert parity["hidden_states"]["relative"] <= 1e-4
            graph = onnx.load(str(folder / model["model_file"]), load_external_data=False).graph
            assert [o.name for o in graph.output] == ["scores"] and [i.name for i in graph.input] == inputs


def test_every_graph_opens_with_standard_onnx_tools_where_it_lies(release, tmp_path):
    """onnx.load / checker / shape inference / onnxruntime.quantization on the folders as exported
    (onnx refuses hard-linked, symlinked or out-of-folder weights: format 3 has none of them)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for folder in sorted(release["out"].iterdir()):
        if not folder.is_dir():
            continue
        assert (folder / "weights.bin").stat().st_nlink == 1 and not (folder / "weights.bin").is_symlink()
        for graph in sorted(folder.glob("*.onnx")):
            onnx.checker.check_model(str(graph))
            loaded = onnx.load(str(graph))  # with its external data
            assert sum(t.ByteSize() for t in loaded.graph.initializer) > 0
            onnx.shape_inference.infer_shapes_path(str(graph), str(tmp_path / "inferred.onnx"), strict_mode=True)
    target = tmp_path / "int8.onnx"
    quantize_dynamic(str(release["out"] / "ratio-1" / "exit-04.onnx"), str(target), weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    onnx.checker.check_model(str(target))


def external_bytes(model_file: Path) -> tuple[set[str], int]:
    graph = onnx.load(str(model_file), load_external_data=False).graph
    locations, total = set(), 0
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            locations.add(info["location"])
            total += int(info["length"])
    return locations, total


def test_exits_of_a_ratio_share_one_weights_file_and_read_only_their_layers(release):
    folder = release["out"] / "ratio-1"
    used = []
    for k in EXITS:
        locations, total = external_bytes(folder / f"exit-0{k}.onnx")
        assert locations == {"weights.bin"}
        used.append(total)
    assert used[0] < used[1] < used[2]  # exit 2 reads fewer tensors than exit 3 than exit 4
    all_locations, all_total = external_bytes(folder / "all-exits.onnx")
    assert all_locations == {"weights.bin"} and all_total == used[-1]  # the deepest exit reads every layer
    assert (folder / "weights.bin").stat().st_size <= 1.2 * all_total  # stored once (plus alignment padding)


@pytest.mark.parametrize("ratio", [1, 2])
def test_an_exit_graph_runs_its_deepest_mlp_for_one_token_per_row_and_all_exits_for_every_token(release, ratio):
    """Exit k's graph is cut from the last-token branch (export.py ``_AllExits``): layer k's MLP sees (B, 1, D);
    the all-exits graph keeps the full layer k (deeper layers continue from it): (B, T, D)."""
    import onnxruntime as ort

    folder = release["out"] / f"ratio-{ratio}"
    pairs = [("what is panda?", "The giant panda is a bear native to China."), ("capital", "Paris is the capital.")]
    encoder = FORMAT.encoder(make_tokenizer())
    batch = encoder.collate_numpy(encoder.encode_many(pairs))
    width = batch["input_ids"].shape[1]
    for name, exit_layer in (("exit-03.onnx", 3), ("all-exits.onnx", 4)):
        proto = onnx.load(str(folder / name))  # with its weights: the copy below is self-contained
        weights = {t.name: list(t.dims) for t in proto.graph.initializer}
        down = [n for n in proto.graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) == [64, 32]]
        assert len(down) == exit_layer  # the tiny model's down projection (intermediate 64 -> hidden 32), per layer
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(down[-1].output[0]))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {i.name: batch[i.name] for i in session.get_inputs()}
        deepest = session.run([down[-1].output[0]], feed)[0]
        expected_width = 1 if name.startswith("exit-") else (width if ratio == 1 else deepest.shape[1])
        assert deepest.shape == (2, expected_width, 32)
        assert ratio == 1 or name.startswith("exit-") or deepest.shape[1] < width  # compressed at layer 2


def test_plan_applies_compression_only_before_the_exit():
    configs = plan_configs([8, 16], [1, 2], [8, 12])
    assert [(c.name, c.applied_layers, c.input_names[2:]) for c in configs] == [
        ("exit-08-ratio-1", (), []), ("exit-16-ratio-1", (), []),
        ("exit-08-ratio-2", (), []), ("exit-16-ratio-2", (8, 12), ["query_lengths", "prompt_lengths"])]


# ------------------------------------------------------------ failures and options
@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama") / "model")


def test_missing_adapters_fail_before_any_work(llama_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        export_models(llama_model, tmp_path / "out", [2], [1], adapters={1: [tmp_path / "nope"]},
                      options=ExportOptions(start_layer=1))
    assert not (tmp_path / "out").exists()


def test_bad_layers_fail_clearly(llama_model, tmp_path):
    with pytest.raises(ValueError, match="no score head"):
        export_models(llama_model, tmp_path / "out", [5], [1], options=ExportOptions(start_layer=1))
    with pytest.raises(ValueError, match="compress layer"):
        export_models(llama_model, tmp_path / "out", [3], [2], [4], options=ExportOptions(start_layer=1))
    too_long = InputFormat(query_max_len=64, passage_max_len=MatryoshkaModel.from_pretrained(
        llama_model, start_layer=1).max_sequence_length)
    with pytest.raises(ValueError, match="more than the model attends to"):
        export_models(llama_model, tmp_path / "out", [3], [1], options=ExportOptions(start_layer=1, input_format=too_long))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["int8", "int8-token"])
def test_float16_export_refuses_int8_schemes_before_any_work(llama_model, tmp_path, scheme):
    """They rewrite float32 graphs: on a float16 one ONNX Runtime refused the copy after every export was done."""
    with pytest.raises(ValueError, match=rf"quantize \['{scheme}'\] needs dtype float32"):
        export_models(llama_model, tmp_path / "out", [2], [1], options=ExportOptions(
            start_layer=1, dtype="float16", input_format=FORMAT, quantize=(scheme,)))
    assert not (tmp_path / "out").exists()


def test_specialist_trained_with_another_input_format_is_refused(llama_model, tmp_path):
    """A specialist is merged into its folder's graphs like the stack: its input_format.json must agree with the
    format the manifest records (it was not checked, so the folder could claim a format it was not trained with)."""
    stack = make_adapter(llama_model, tmp_path / "sd", 8)
    FORMAT.save(stack)
    model = MatryoshkaModel.from_pretrained(llama_model, start_layer=1).truncate(2)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, bias="none",
                        target_modules=target_pattern(["q_proj", "v_proj", "score_heads"]))
    specialist = tmp_path / "specialist-02"
    get_peft_model(model, config).save_pretrained(specialist)
    InputFormat(query_max_len=24, passage_max_len=48).save(specialist)
    with pytest.raises(InputFormatError, match=r"specialist-02 was trained with a different input format .*"
                                              r"passage_max_len: 48 vs 24"):
        export_models(llama_model, tmp_path / "out", [2, 4], [1], adapters={1: [stack]},
                      options=ExportOptions(start_layer=1), specialists={2: specialist})
    assert not (tmp_path / "out").exists()


def test_dropped_causal_mask_is_caught_where_scores_cannot_see_it(llama_model, tmp_path, monkeypatch):
    """At exit 1 the last real token's score is the same with or without the causal mask (it sees
    every real token either way): only the every-token hidden-state check can catch the bad graph."""
    real_bias = modeling.attention_bias

    def padding_only_when_exporting(mask, dtype, implementation="eager"):
        if not torch.compiler.is_exporting():
            return real_bias(mask, dtype, implementation)
        bias = torch.zeros(mask.shape[0], 1, mask.shape[1], mask.shape[1], dtype=dtype)
        return bias.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(dtype).min)

    monkeypatch.setattr(modeling, "attention_bias", padding_only_when_exporting)
    out = tmp_path / "out"
    out.mkdir()
    (out / "last-good").write_text("kept")
    with pytest.raises(ExportError, match="hidden-state check"):
        export_models(llama_model, out, [1], [1], options=ExportOptions(start_layer=1, input_format=FORMAT))
    assert (out / "last-good").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parity_beyond_tolerance_fails_loudly(llama_model, tmp_path, monkeypatch):
    from matryoshka_reranker.pipeline import export as export_module

    real_reference = export_module._reference

    def shifted(*args):
        result = real_reference(*args)
        return {**result, "scores": {k: v + 1e-3 for k, v in result["scores"].items()}}

    monkeypatch.setattr(export_module, "_reference", shifted)
    with pytest.raises(ExportError, match=r"differ from PyTorch by 0\.001"):
        export_models(llama_model, tmp_path / "out", [2], [1],
                      options=ExportOptions(start_layer=1, input_format=FORMAT))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch", [0, 3], ids=["ragged-batch", "one-pair-batch"])
def test_parity_beyond_tolerance_in_any_one_batch_fails(llama_model, tmp_path, monkeypatch, batch):
    """Parity is the worst difference over every validation batch (the ragged batch of all pairs, then each pair
    alone): a graph wrong only with padding, or only for one pair, must fail as loudly as one wrong everywhere."""
    from matryoshka_reranker.pipeline import export as export_module

    real_reference = export_module._reference
    calls = []

    def shifted_once(*args):
        result = real_reference(*args)
        calls.append(None)
        if len(calls) - 1 != batch:
            return result
        return {**result, "scores": {k: v + 1e-3 for k, v in result["scores"].items()}}

    monkeypatch.setattr(export_module, "_reference", shifted_once)
    with pytest.raises(ExportError, match=r"differ from PyTorch by 0\.001"):
        export_models(llama_model, tmp_path / "out", [2], [1],
                      options=ExportOptions(start_layer=1, input_format=FORMAT))
    assert len(calls) > 3 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [dict(dynamo=False), dict(dtype="float16"), dict(share_weights=False)],
                         ids=["torchscript", "float16", "per-exit-weights"])
def test_export_options(llama_model, tmp_path, options):
    export_models(llama_model, tmp_path / "out", [3], [2], [2],
                  options=ExportOptions(start_layer=1, input_format=FORMAT, **options))
    folder = tmp_path / "out" / "ratio-2"
    manifest = model_view(read_manifest(folder), 3)
    ort_scores = OnnxReranker(folder, 3).compute_score(PAIRS)
    expected = MatryoshkaReranker(llama_model, start_layer=1, input_format=FORMAT).compute_score(
        PAIRS, cutoff_layers=[3], compress_layers=COMPRESS, compress_ratio=2)
    tolerance = 5e-2 if options.get("dtype") == "float16" else 1e-4
    assert manifest["parity"]["tolerance"] == tolerance
    np.testing.assert_allclose(ort_scores, expected, atol=tolerance, rtol=0)
    if "dynamo" in options:
        assert manifest["exporter"] == "torchscript"
    if "dtype" in options:
        assert manifest["dtype"] == "float16"
        types = {t.data_type for t in onnx.load(str(folder / "exit-03.onnx"), load_external_data=False).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types
    if "share_weights" in options:
        assert external_bytes(folder / "exit-03.onnx")[0] == {"exit-03.onnx.data"}
        assert not manifest["shared_weights"] and "exit-03.onnx.data" in manifest["files"]
        assert "weights.bin" not in manifest["files"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no scratch left behind


# ------------------------------------------------------------ CLI
def test_cli_explicit_form(llama_model, tmp_path):
    adapter = make_adapter(llama_model, tmp_path / "adapter", 5)
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", "--model", str(llama_model), "--peft-path", str(adapter),
                                      "--layers", "2", "4", "--start-layer", "1", "--query-max-len", "24", "--passage-max-len", "24",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["exit-02-ratio-1", str(out / "ratio-1" / "exit-02.onnx"),
                                     "exit-04-ratio-1", str(out / "ratio-1" / "exit-04.onnx")]
    manifest = read_manifest(out / "ratio-1")
    assert manifest["input_format"] == FORMAT.to_dict()
    assert [a["path"] for a in manifest["adapters"]] == [str(adapter)]
    expected = MatryoshkaReranker(llama_model, peft_path=adapter, start_layer=1, input_format=FORMAT).compute_score(
        PAIRS, cutoff_layers=[4])
    np.testing.assert_allclose(OnnxReranker(out / "ratio-1", 4).compute_score(PAIRS), expected, atol=1e-4, rtol=0)


def write_params(tmp_path, model_dir, **export) -> Path:
    params = {
        "model": {"name_or_path": str(model_dir), "start_layer": 1, "query_max_len": 16, "passage_max_len": 32},
        "compression": {"layers": [2]},
        "compensation": {"token_ratios": [2]},
        "export": {"exit_layers": [3], "ratios": [1], "compress_layers": [2],
                   "calibration_queries": 0, **export},
        "paths": {"self_distill": str(tmp_path / "sd"), "compensation": str(tmp_path / "comp"),
                  "onnx": str(tmp_path / "onnx")},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_params_form_merges_the_adapter_stack(llama_model, tmp_path):
    params = write_params(tmp_path, llama_model)
    result = CliRunner().invoke(app, ["export", "--params", str(params)])
    assert result.exit_code == 2 and "adapter folder(s) missing" in result.output
    assert str(tmp_path / "sd") in result.output and str(tmp_path / "comp" / "layer") in result.output

    stack = [make_adapter(llama_model, tmp_path / "sd", 6), make_adapter(llama_model, tmp_path / "comp" / "layer", 7)]
    result = CliRunner().invoke(app, ["export", "-p", str(params), "-S", "export.exit_layers=[2]"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "onnx" / "ratio-1")
    assert [m["name"] for m in manifest["models"]] == ["exit-02-ratio-1", "all-exits-ratio-1"]
    assert [a["path"] for a in manifest["adapters"]] == [str(p) for p in stack]
    assert manifest["input_format"] == InputFormat(query_max_len=16, passage_max_len=32).to_dict()
    from matryoshka_reranker.config import load_params

    assert manifest["params_fingerprint"] == load_params(params, ["export.exit_layers=[2]"]).fingerprint()


def test_cli_rejects_mixed_forms(llama_model, tmp_path):
    result = CliRunner().invoke(app, ["export", "--layers", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--layers, --out need --model" in result.output
    result = CliRunner().invoke(app, ["export", "--model", str(llama_model), "--layers", "2", "--out", str(tmp_path),
                                      "-S", "export.opset=18"])
    assert result.exit_code == 2 and "cannot be combined" in result.output


def test_calibration_and_model_card(llama_model, tmp_path):
    from matryoshka_reranker.pipeline.calibration import CalibrationSet

    calibration = CalibrationSet(("q1", "q2"), tuple(PAIRS), (1, 0, 0, 1, 0))
    export_models(llama_model, tmp_path / "out", [2, 4], [1], options=ExportOptions(
        start_layer=1, input_format=FORMAT, calibration=calibration, data_dir="data/scifact"))
    folder = tmp_path / "out" / "ratio-1"
    manifest = read_manifest(folder)  # verifies every file, the card included
    fitted = model_view(manifest, 4)["calibration"]
    assert fitted["method"] == "platt" and fitted["pairs"] == 5 and fitted["queries"] == ["q1", "q2"]
    assert model_view(manifest, 2)["calibration"] != fitted  # one fit per exit
    reranker = OnnxReranker(folder, 4)
    raw = np.array(reranker.compute_score(PAIRS))
    expected = 1 / (1 + np.exp(-(fitted["a"] * raw + fitted["b"])))
    np.testing.assert_allclose(reranker.compute_score(PAIRS, normalize=True), expected, atol=1e-6)
    # calibrated probabilities rank as the raw scores do
    assert np.argsort(-raw).tolist() == np.argsort(-expected).tolist()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert "calibration" not in model_view(read_manifest(tmp_path / "out" / index["all_exits"][0]["path"]), all_exits=True)
    card = (folder / "README.md").read_text()
    assert "README.md" in manifest["files"] and card.startswith("---\n")
    assert "pipeline_tag: text-ranking" in card and "CC BY-NC 2.0" in card and "exit layers 2, 4" in card
    assert "OnnxReranker" in card and "/rerank" in card and "Platt" in card


def test_quantized_copies_are_plain_loadable_configs(llama_model, tmp_path):
    index = export_models(llama_model, tmp_path / "out", [2, 4], [1], options=ExportOptions(
        start_layer=1, input_format=FORMAT, quantize=("int8", "int8-token", "int4"), quantize_smoothing=0.75))
    names = [m["name"] for m in index["models"]]
    assert names == ["exit-02-ratio-1", "exit-04-ratio-1", "exit-02-ratio-1-int8", "exit-04-ratio-1-int8",
                     "exit-02-ratio-1-int8-token", "exit-04-ratio-1-int8-token",
                     "exit-02-ratio-1-int4", "exit-04-ratio-1-int4"]
    for scheme in ("int8", "int8-token", "int4"):
        folder = tmp_path / "out" / f"exit-04-ratio-1-{scheme}"
        manifest = read_manifest(folder)
        assert manifest["variant"] == scheme and manifest["quantization"]["of"] == "exit-04-ratio-1"
        # activation schemes are smoothed from the calibration batches (here: the fixed validation pairs)
        assert ("smoothing" in manifest["quantization"]) == (scheme != "int4")
        assert parse_config_name(folder.name) == (4, 1, scheme)  # a hyphenated variant parses back whole
        assert [m["name"] for m in manifest["models"]] == [f"exit-04-ratio-1-{scheme}"]
        assert (folder / "model.onnx.data").stat().st_nlink == 1  # its own plain file: standard tools open it
        onnx.checker.check_model(str(folder / "model.onnx"))
        quantized = OnnxReranker(folder).compute_score(PAIRS)
        float_scores = OnnxReranker(tmp_path / "out" / "ratio-1", 4).compute_score(PAIRS)
        assert np.isfinite(quantized).all() and np.abs(np.array(quantized) - float_scores).max() < 0.5



def test_quantization_statistics_come_from_training_pairs_not_eval_queries(llama_model, tmp_path, monkeypatch):
    """SmoothQuant's channel maxima are taken on training pairs (``quantization_pairs``: the prepared groups,
    at most 4 pairs per query, positives first), never on the eval queries the quantized copies are scored on;
    the export quantizes with exactly those pairs."""
    from matryoshka_reranker.config import parse_params
    from matryoshka_reranker.pipeline.export import quantization_pairs

    groups = tmp_path / "train_groups.jsonl"
    rows = [{"query_id": str(i), "query": f"train query {i}", "pos": [f"pos {i}"], "neg": [f"neg {i}.{j}" for j in range(6)]}
            for i in range(12)]
    groups.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = parse_params({"paths": {"train_groups": str(groups)}, "export": {"quantize_calibration_pairs": 30}})
    pairs = quantization_pairs(params)
    assert len(pairs) == 30 and pairs[:5] == (("train query 0", "pos 0"), ("train query 0", "neg 0.0"),
                                              ("train query 0", "neg 0.1"), ("train query 0", "neg 0.2"),
                                              ("train query 1", "pos 1"))
    assert {q for q, _ in pairs} == {f"train query {i}" for i in range(8)}  # 4 per query: 30 pairs span 8 queries
    index = export_models(llama_model, tmp_path / "out", [4], [1], options=ExportOptions(
        start_layer=1, input_format=FORMAT, quantize=("int8-token",), quantize_smoothing=0.75, quantize_pairs=pairs))
    assert len(index["models"]) == 2
    smoothing = read_manifest(tmp_path / "out" / "exit-04-ratio-1-int8-token")["quantization"]["smoothing"]
    assert smoothing["calibration_batches"] == 2  # 30 pairs in batches of 16 (the validation pairs would be 1)

    # the pipeline stage hands exactly those pairs to the export (and none when nothing is quantized)
    from matryoshka_reranker.pipeline import export as export_module

    seen = []
    monkeypatch.setattr(export_module, "export_models", lambda *a, options, **k: seen.append(options))
    for quantize in (["int8-token"], []):
        export_module.export_from_params(parse_params({
            "paths": {"train_groups": str(groups)},
            "export": {"quantize_calibration_pairs": 30, "quantize": quantize, "calibration_queries": 0}}))
    assert seen[0].quantize_pairs == pairs and seen[1].quantize_pairs == ()


def test_a_quantized_copy_is_calibrated_on_its_own_scores(llama_model, tmp_path):
    """Quantization moves the scores: the copy's Platt (a, b) is fitted to them, not carried over from the float."""
    from matryoshka_reranker.pipeline.calibration import CalibrationSet, fit_platt

    calibration = CalibrationSet(("q1", "q2"), tuple(PAIRS), (1, 0, 0, 1, 0))
    export_models(llama_model, tmp_path / "out", [4], [1], options=ExportOptions(
        start_layer=1, input_format=FORMAT, calibration=calibration, quantize=("int8",), quantize_smoothing=0.75))
    float_fit = model_view(read_manifest(tmp_path / "out" / "ratio-1"), 4)["calibration"]
    folder = tmp_path / "out" / "exit-04-ratio-1-int8"
    own = model_view(read_manifest(folder), 4)["calibration"]
    raw = OnnxReranker(folder).compute_score(PAIRS)
    expected = fit_platt(raw, calibration.labels)
    assert own["method"] == "platt" and own["queries"] == ["q1", "q2"]
    np.testing.assert_allclose([own["a"], own["b"]], [expected["a"], expected["b"]], rtol=1e-4, atol=1e-6)
    assert (own["a"], own["b"]) != (float_fit["a"], float_fit["b"])


def test_platt_fit_rises_with_the_score_whatever_its_offset_or_spread():
    """A shallow exit's logits can sit in a narrow band far from 0, or not rank the calibration pairs at
    all: the fit must still find the slope (not a near-zero or negative one), and a mapping that would
    fall as the raw score rises (reversing ``rank(normalize=True)``) is never shipped."""
    from matryoshka_reranker.pipeline.calibration import fit_platt
    from matryoshka_reranker.serving.artifacts import calibrated_probability

    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, 40)
    labels = (s + rng.normal(0, 1, 40) > 0).astype(int).tolist()
    reference = fit_platt(s, labels)
    for spread, offset in [(1.0, 100.0), (0.01, 3.0), (1.0, -1000.0)]:
        fitted = fit_platt(s * spread + offset, labels)
        assert fitted["method"] == "platt"
        assert fitted["a"] == pytest.approx(reference["a"] / spread, rel=1e-3)
        np.testing.assert_allclose(calibrated_probability(fitted, s * spread + offset),
                                   calibrated_probability(reference, s), atol=1e-4)
    for scores in ([3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [5.0] * 6):  # anti-correlated, constant
        fitted = fit_platt(scores, [0, 0, 0, 1, 1, 1])
        assert fitted["a"] > 0 and "note" in fitted
        p = calibrated_probability(fitted, [-2.0, 0.0, 2.0])
        assert p[0] < p[1] < p[2]
    # large anti-correlated logits (as a default run's exit 30 at ratio 2): the probability stays near the base
    # rate (1 in 4 here), rising with the score, not the plain sigmoid's ~1 for every pair
    falling = fit_platt([48.0, 47.0, 46.0, 45.0, 50.0, 49.0, 44.0, 43.0], [0, 0, 0, 0, 0, 0, 1, 1])
    p = calibrated_probability(falling, [43.0, 46.0, 50.0])
    assert falling["method"] == "platt" and "floor" in falling["note"]
    assert p[0] < p[1] < p[2] and np.all(np.abs(p - 0.3) < 0.1)


def test_calibrated_probability_of_far_out_scores_is_0_or_1_without_overflow():
    import warnings

    from matryoshka_reranker.serving.artifacts import calibrated_probability

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in exp" reached every caller
        p = calibrated_probability({"a": 40.0, "b": 0.0}, [-30.0, -1.0, 0.0, 1.0, 30.0])
    assert p[0] == 0.0 and p[-1] == 1.0 and p[2] == 0.5 and np.all(np.diff(p) >= 0)
    np.testing.assert_allclose(p[1:4], 1 / (1 + np.exp([40.0, 0.0, -40.0])), rtol=1e-12)


def test_release_card_states_the_recorded_interval_and_a_released_exit():
    """The release card's numbers come from the record: the interval is the evaluation's confidence
    (``evaluation.confidence``), and its usage example opens an exit the release has."""
    from matryoshka_reranker.pipeline.model_card import release_card

    configs = {f"exit-0{k}-ratio-{r}": {"exit_layer": k, "ratio": r, "nDCG@10": 0.5 + 0.01 * k,
                                        "nDCG@10_ci": [0.4, 0.6], "latency_ms_per_query": 2.0}
               for k in (4, 6) for r in (1, 2)}
    record = {"files": {name: {} for name in configs}, "artifacts": {name: {"path": "x"} for name in configs},
              "policy": {"measures": ["nDCG@10"]}, "gate": {"passed": True},
              "metrics": {"eval": {"queries": 40, "candidates": 5, "confidence": 0.9}, "configs": configs}}
    card = release_card("v0.1.0", record)
    assert "| exit-06-ratio-1 | 0.560 [0.400, 0.600] | 2 |" in card and "40 eval queries x 5" in card
    assert "90% bootstrap interval" in card and "95%" not in card
    assert 'OnnxReranker("downloads/v0.1.0/ratio-1", exit_layer=6)' in card and "exit_layer=30" not in card


def test_folder_card_calls_an_identity_calibration_none():
    """An exit whose Platt fit fell back to identity (one class, or scores that do not rise with relevance)
    is not calibrated: the card says so instead of listing (1, 0) as a fitted calibration."""
    from matryoshka_reranker.pipeline.model_card import ratio_card

    fitted = {"method": "platt", "a": 0.7, "b": -1.2, "pairs": 40, "positives": 9}
    identity = {"method": "none", "a": 1.0, "b": 0.0, "pairs": 40, "positives": 9, "note": "slope -0.3: identity"}
    manifest = {"name": "ratio-1", "source_model": "m", "num_layers": 4, "dtype": "float32", "opset": 18,
                "compression": {"ratio": 1, "layers": []}, "adapters": [],
                "input_format": {"template": "t", "query_max_len": 8, "passage_max_len": 8, "prompt": "p"},
                "models": [{"kind": "exit", "exit_layer": 2, "model_file": "exit-02.onnx", "calibration": identity},
                           {"kind": "exit", "exit_layer": 4, "model_file": "exit-04.onnx", "calibration": fitted}]}
    card = ratio_card(manifest)
    assert "| 2 | `exit-02.onnx` | none | nan | none (slope -0.3: identity) |" in card
    assert "| 4 | `exit-04.onnx` | none | nan | 0.7000, -1.2000 (40 pairs) |" in card


def test_the_explicit_export_takes_the_token_adapters_width_by_default(tmp_path):
    """``matryoshka export --model M --peft-path sd layer token-ratio-2 --layers ...`` exported ratio 1 (a model
    the token adapter never trained as) while ``score`` with the same adapters compresses at ratio 2."""
    from matryoshka_reranker.cli import _trained_width
    from matryoshka_reranker.model.adapters import TRAINING_LOG

    stack = []
    for name, plan in (("sd", {"layers": [8], "ratios": [1, 2, 4], "sample": True}),
                       ("token", {"layers": [8, 16], "ratios": [2], "sample": False})):
        (tmp_path / name).mkdir()
        (tmp_path / name / TRAINING_LOG).write_text(json.dumps({"compression": plan}))
        stack.append(tmp_path / name)
    assert _trained_width(stack, None, None) == ([2], [8, 16])
    assert _trained_width(stack, [1, 2], None) == ([1, 2], [])  # given: as given
    assert _trained_width(stack, None, [12]) == ([2], [12])
    assert _trained_width(stack[:1], None, None) == ([1], [])  # self-distillation alone: every width, so ratio 1
    assert _trained_width(None, None, None) == ([1], [])
