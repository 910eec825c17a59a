"""Quantized copies: the per-token int8 rewrite against its arithmetic, and against one scale per tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from matryoshka_reranker.pipeline.quantize import channel_maxima, per_token_int8, quantize_model, smooth

K, N = 64, 48


def _matmul_model(weight: np.ndarray, leading: tuple[str, ...] = ("batch", "sequence")) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*leading, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*leading, N])],
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
    x[1, 2] = 3.0 + np.abs(x[1, 2])  # a row of one sign, far from 0: the step's floor binds there
    model = _matmul_model(w)
    assert per_token_int8(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("MatMulIntegerToFloat") == 1
    assert "w" not in {t.name for t in model.graph.initializer}  # the float weight is gone
    # The same quantization written out in numpy: per row, 253 steps over its range, the grid
    # centred on the middle of the range in whole steps (so 0 stays on the grid: near-zero values
    # round to exactly 0 instead of sharing one offset, which would add up along K), the step no
    # finer than |middle| / 127 (so the per-row uint8 zero point 128 - centre exists).
    hi, lo = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    mid = (hi + lo) / 2
    scale = np.maximum((hi - lo) / 253, np.abs(mid) / 127)
    assert (scale > (hi - lo) / 253).sum() == 1  # only the one-sign row
    zc = np.round(mid / scale)
    assert np.abs(zc).max() <= 127
    q = np.round(x / scale) - zc
    assert np.abs(q).max() <= 127  # so uint8 with zero point 128 holds it without clipping
    centre = zc * scale
    w_scale = np.abs(w).max(0) / 127
    w_q = np.clip(np.round(w / w_scale), -127, 127)
    expected = (q @ w_q) * scale * w_scale + centre * (w_q.sum(0) * w_scale)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-4, atol=1e-5)


def test_rows_of_a_two_dimensional_input_are_quantized_the_same_way():
    """The rewrite views each input as (rows, K) and back through the input's own shape: a (tokens, K)
    input gives the same rows as the same tokens inside a (batch, sequence, K) one."""
    x, w = _inputs()
    flat, batched = _matmul_model(w, ("tokens",)), _matmul_model(w)
    per_token_int8(flat)
    per_token_int8(batched)
    np.testing.assert_array_equal(_run(flat, x.reshape(-1, K)), _run(batched, x).reshape(-1, N))


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
    # the same float MatMul: bit for bit the untouched graph's output (numpy's x @ w may sum in another order:
    # it differed by 1 ulp on an AMD EPYC host)
    np.testing.assert_array_equal(_run(model, x), _run(_matmul_model(w), x))
    np.testing.assert_allclose(_run(model, x), x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", "int3")


def test_constant_and_zero_rows_stay_exact_enough():
    """A row whose values are all equal (or all zero) has no range: the scale's floor keeps its grid
    centre a small whole number of steps, so the uint8 cast cannot wrap around."""
    _, w = _inputs()
    x = np.zeros((1, 3, K), np.float32)
    x[0, 1] = 0.5     # constant row
    x[0, 2] = -123.0  # constant, large and negative
    model = _matmul_model(w)
    per_token_int8(model)
    w_scale = np.abs(w).max(0) / 127
    dequantized = np.clip(np.round(w / w_scale), -127, 127) * w_scale  # the weights' own rounding aside,
    np.testing.assert_allclose(_run(model, x), x @ dequantized, rtol=1e-4, atol=1e-4)  # such rows are exact


def _norm_then_two_matmuls(gamma: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x * gamma (an RMSNorm's weight) feeding two projections, as q/k/v or gate/up are fed."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gamma"], ["normed"], name="norm"),
         helper.make_node("MatMul", ["normed", "w1"], ["y1"], name="p1"),
         helper.make_node("MatMul", ["normed", "w2"], ["y2"], name="p2"),
         helper.make_node("Add", ["y1", "y2"], ["y"], name="sum")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", N])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _channel_outlier_inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.0, (2, 6, K)).astype(np.float32)
    x[..., 7] *= 300.0  # one channel far above the rest in every token (what Llama's norms produce)
    gamma = rng.uniform(0.5, 1.5, K).astype(np.float32)
    return x, gamma, rng.normal(0, 0.05, (K, N)).astype(np.float32), rng.normal(0, 0.05, (K, N)).astype(np.float32)


def test_smoothing_is_exact_in_float_and_folds_into_the_norm_weight():
    x, gamma, w1, w2 = _channel_outlier_inputs()
    model = _norm_then_two_matmuls(gamma, w1, w2)
    maxima = channel_maxima(model, [{"x": x}])
    assert set(maxima) == {"normed"} and maxima["normed"].argmax() == 7
    assert smooth(model, maxima, alpha=0.75) == 1
    assert [n.op_type for n in model.graph.node] == ["Mul", "MatMul", "MatMul", "Add"]  # folded: no new node
    folded = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gamma"))
    assert folded[7] < gamma[7] / 10  # the outlier channel is scaled down, its weights' row up
    np.testing.assert_allclose(_run(model, x), (x * gamma) @ w1 + (x * gamma) @ w2, rtol=1e-4, atol=1e-3)


def test_smoothing_inserts_a_mul_where_it_cannot_fold():
    x, _, w, _ = _channel_outlier_inputs()
    model = _matmul_model(w)  # the input comes straight from the graph input
    smooth(model, channel_maxima(model, [{"x": x}]), alpha=0.5)
    assert [n.op_type for n in model.graph.node] == ["Mul", "MatMul"]
    np.testing.assert_allclose(_run(model, x), x @ w, rtol=1e-4, atol=1e-3)



def test_smoothing_a_weight_shared_by_two_inputs_stays_exact():
    """A compression layer's graph reads its k_proj weight twice (the layer's own keys, and
    last_token_attention's recomputed ones: another input): each input's factors must reach only its
    own MatMuls' weights, not be multiplied into the shared one twice."""
    x, gamma, w1, wk = _channel_outlier_inputs()
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gamma"], ["normed"], name="norm"),
         helper.make_node("MatMul", ["normed", "w1"], ["y1"], name="q"),
         helper.make_node("MatMul", ["normed", "wk"], ["y2"], name="k"),
         helper.make_node("Mul", ["x", "gamma"], ["normed_again"], name="norm_again"),
         helper.make_node("Relu", ["normed_again"], ["other"], name="other_input"),
         helper.make_node("MatMul", ["other", "wk"], ["y3"], name="k_again"),
         helper.make_node("Sum", ["y1", "y2", "y3"], ["y"], name="sum")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", N])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(wk, "wk")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    assert smooth(model, channel_maxima(model, [{"x": x}]), alpha=0.75) == 2
    normed = x * gamma
    np.testing.assert_allclose(_run(model, x), normed @ w1 + normed @ wk + np.maximum(normed, 0) @ wk,
                               rtol=1e-4, atol=1e-3)
    per_token_int8(model)
    exact = normed @ w1 + normed @ wk + np.maximum(normed, 0) @ wk
    assert np.abs(_run(model, x) - exact).mean() / np.abs(exact).mean() < 0.02

def test_smoothing_shrinks_the_per_token_error_of_a_channel_outlier(tmp_path):
    x, gamma, w1, w2 = _channel_outlier_inputs()
    exact = (x * gamma) @ w1 + (x * gamma) @ w2

    def error(alpha):
        model = _norm_then_two_matmuls(gamma, w1, w2)
        if alpha:
            smooth(model, channel_maxima(model, [{"x": x}]), alpha)
        per_token_int8(model)
        return np.abs(_run(model, x) - exact).mean() / np.abs(exact).mean()

    assert error(0.75) < error(0.0) / 2  # measured: 0.0037 vs 0.0099
    source = tmp_path / "m.onnx"
    onnx.save(_norm_then_two_matmuls(gamma, w1, w2), str(source))
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_model(source, tmp_path / "q.onnx", "int8-token", smoothing=0.75)
    info = quantize_model(source, tmp_path / "q.onnx", "int8-token", keep_fp32=["score_heads"],
                          calibration=[{"x": x}], smoothing=0.75)
    assert info["smoothing"]["inputs"] == 1 and info["nodes_kept_fp32"] == 0
    quantized = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(quantized - exact).mean() / np.abs(exact).mean() < 0.02


@pytest.mark.parametrize("scheme", ["int8", "int8-token", "int4"])
def test_quantized_files_follow_the_umask(tmp_path, scheme):
    """onnx (and ONNX Runtime through it) creates the external weights file 0600: a copy exported by one
    user could not be served by another, where its fp32 folder can (core/atomic.py: files follow the umask)."""
    import os

    x, gamma, w1, w2 = _channel_outlier_inputs()
    source, target = tmp_path / "m.onnx", tmp_path / "q" / "model.onnx"
    target.parent.mkdir()
    onnx.save(_norm_then_two_matmuls(gamma, w1, w2), str(source))
    old = os.umask(0o022)
    try:
        quantize_model(source, target, scheme, calibration=[{"x": x}], smoothing=0.75)
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in target.parent.iterdir()} == {
        "model.onnx": "0o644", "model.onnx.data": "0o644"}


def test_parts_kept_in_fp32_are_found_by_shape_and_order(tmp_path):
    """Exported graphs name weights generically: parts are found by weight shape and graph order."""
    from matryoshka_reranker.pipeline.quantize import _matmuls_to_keep

    hidden, intermediate = 8, 24
    shapes = [("l1_q", (hidden, hidden)), ("l1_up", (hidden, intermediate)), ("l1_down", (intermediate, hidden)),
              ("l2_q", (hidden, hidden)), ("l2_up", (hidden, intermediate)), ("l2_down", (intermediate, hidden)),
              ("head", (hidden, 1))]
    nodes, inits, x = [], [], "x"
    for name, shape in shapes:
        nodes.append(helper.make_node("MatMul", [x if name != "head" else "h", name + "_w"], [name + "_y"], name=name))
        inits.append(numpy_helper.from_array(np.zeros(shape, np.float32), name + "_w"))
        x = name + "_y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden]),
                                           helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert _matmuls_to_keep(path, ["first_layer"]) == ["l1_q", "l1_up", "l1_down"]
    assert _matmuls_to_keep(path, ["down_proj", "score_heads"]) == ["l1_down", "l2_down", "head"]
    assert _matmuls_to_keep(path, ["down_proj@2"]) == ["l2_down"]
    assert _matmuls_to_keep(path, ["all@2-3", "score_heads"]) == ["l2_q", "l2_up", "l2_down", "head"]
    assert _matmuls_to_keep(path, ["all_mlp@1-2"]) == ["l1_up", "l1_down", "l2_up", "l2_down"]
    with pytest.raises(ValueError, match="unknown part"):
        _matmuls_to_keep(path, ["lm_head"])
    for bad in ("down_proj@x", "all@3-2", "all@0"):
        with pytest.raises(ValueError, match="@a-b"):
            _matmuls_to_keep(path, [bad])
    with pytest.raises(ValueError, match="unknown part"):  # score heads have no layer
        _matmuls_to_keep(path, ["score_heads@1"])


@pytest.mark.parametrize("bad", ["first_layer@2", "all@3-2", "score_heads@5", "down_proj@0", "lm_head"])
def test_params_refuse_a_part_export_would_refuse_or_ignore(bad):
    from matryoshka_reranker.config import parse_params

    with pytest.raises(ValueError, match="quantize_keep_fp32"):
        parse_params({"export": {"quantize_keep_fp32": [bad]}})
