"""Quantized copies: the per-token int8 rewrite against its arithmetic, and against one scale per tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from matryoshka_reranker.pipeline.quantize import per_token_int8, quantize_model

K, N = 64, 48


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", N])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 0.1, (2, 5, K)).astype(np.float32)
    x[0, 0, 3] = 40.0  # one token with a massive activation, as a Llama model's first tokens carry
    return x, w


def test_per_token_int8_matches_its_arithmetic():
    x, w = _inputs()
    model = _matmul_model(w)
    assert per_token_int8(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("MatMulInteger") == 1
    assert "w" not in {t.name for t in model.graph.initializer}  # the float weight is gone
    # The same quantization written out in numpy (per-row asymmetric uint8, per-column symmetric int8).
    lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
    scale = (hi - lo) / 255
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    w_scale = np.abs(w).max(0) / 127
    w_q = np.clip(np.round(w / w_scale), -127, 127)
    expected = ((q - zp) @ w_q) * scale * w_scale
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-4, atol=1e-5)


def test_one_outlier_token_does_not_flatten_the_others(tmp_path):
    """Why the scheme exists: with one scale per tensor (quantize_dynamic) the outlier token sets the
    step for every token; per token, the other tokens keep their resolution."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    x, w = _inputs()
    exact = x @ w
    mask = np.ones(x.shape[:2], bool)
    mask[0, 0] = False

    def error(y):  # relative error on the tokens without the outlier
        return np.abs(y - exact)[mask].max() / np.abs(exact[mask]).max()

    per_token = _matmul_model(w)
    per_token_int8(per_token)
    source, target = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_matmul_model(w), str(source))
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    token_error, tensor_error = error(_run(per_token, x)), error(_run(onnx.load(str(target)), x))
    assert token_error < 0.02
    assert tensor_error > 5 * token_error


def test_kept_nodes_stay_float_and_scheme_is_checked(tmp_path):
    x, w = _inputs()
    model = _matmul_model(w)
    assert per_token_int8(model, keep=["proj"]) == 0
    np.testing.assert_array_equal(_run(model, x), x @ w)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", "int3")
