"""Local error of every MatMul that ``int8-token`` quantizes, layer by layer (which parts to keep in fp32?).

    python -m benchmarks.quantize_layer_error --params P --exit 30 [--alpha 0.75] [--alpha-down A]
        [--batches 4] [--decompose]

Applies the export's SmoothQuant (maxima over the calibration pairs) to the exported exit model, keeps
the scheme's default parts in fp32, captures each quantized MatMul's input on the first calibration
batches, and prints ``||Q(x) Q(W) - x W|| / ||x W||`` per projection, with ``int8-token``'s arithmetic
in numpy (per-row uint8 around a whole-step centre, per-column int8 weights): the error each MatMul
adds on its own, before it compounds through the layers. Projections are named by weight shape.

``--alpha-down`` smooths down_proj's input with its own alpha (the export uses one for all);
``--decompose`` splits down_proj's error into its parts: activations alone quantized, weights alone,
and activations quantized in groups of 128 channels (what a K-split GEMM would give). Together they
say whether a finer scheme for down_proj could buy back what exit 30 loses (docs/export.md).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from matryoshka_reranker.config import load_params
from matryoshka_reranker.pipeline.export import quantization_batches, quantization_pairs
from matryoshka_reranker.pipeline.quantize import (
    DEFAULT_KEEP_FP32,
    _matmuls_to_keep,
    _quantizable,
    channel_maxima,
    smooth,
)
from matryoshka_reranker.serving.artifacts import exit_model_file, ratio_folder


def quantize_rows(x: np.ndarray) -> np.ndarray:
    """int8-token's activation grid, dequantized: 253 steps over the row's range, centre on the grid."""
    low, high = x.min(1, keepdims=True), x.max(1, keepdims=True)
    scale = np.maximum((high - low) / 253, np.abs(x).max(1, keepdims=True) / 16256 + 1e-30)
    centre = np.round((high + low) / 2 / scale)
    q = np.clip(np.round(x / scale) - centre + 128, 0, 255)
    return (q - 128 + centre) * scale


def quantize_columns(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(0, keepdims=True) / 127 + 1e-30
    return np.round(w / scale) * scale


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from transformers import AutoTokenizer

    from matryoshka_reranker.core.assets import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--exit", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=None, help="default: export.quantize_smoothing")
    parser.add_argument("--alpha-down", type=float, default=None, help="down_proj's own alpha (default: --alpha)")
    parser.add_argument("--decompose", action="store_true", help="down_proj: activation / weight / grouped error")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (16 pairs) to measure on")
    args = parser.parse_args()
    params = load_params(args.params)
    alpha = params.export.quantize_smoothing if args.alpha is None else args.alpha
    encoder = params.model.input_format.encoder(AutoTokenizer.from_pretrained(resolve_model_path(
        params.model.name_or_path)))
    feeds = quantization_batches(encoder, quantization_pairs(params))  # the export's own pairs and batches
    path = f"{params.paths.onnx}/{ratio_folder(1)}/{exit_model_file(args.exit)}"
    keep = _matmuls_to_keep(path, DEFAULT_KEEP_FP32["int8-token"])
    model = onnx.load(path)
    if alpha:
        maxima = channel_maxima(model, feeds, keep)  # before any smoothing: folding keeps every input's values
        down = set(_matmuls_to_keep(path, ("down_proj",)))
        others = [n.name for n in _quantizable(model, keep) if n.name not in down]
        smooth(model, maxima, alpha, [*keep, *down])
        smooth(model, maxima, alpha if args.alpha_down is None else args.alpha_down, [*keep, *others])
    nodes = _quantizable(model, keep)
    inits = {t.name: t for t in model.graph.initializer}
    names = list(dict.fromkeys(n.input[0] for n in nodes))
    probe = copy.deepcopy(model)
    probe.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    captured: dict[str, list] = {n: [] for n in names}
    for feed in feeds[:args.batches]:
        real = feed["attention_mask"].reshape(-1).astype(bool)  # (B*T,) the rows of real tokens
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in inputs})):
            rows = value.reshape(-1, value.shape[-1])
            captured[name].append(rows[real] if len(rows) == len(real) else rows)
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes}
    intermediate = max(w.shape[0] for w in weights.values())
    print(f"# exit {args.exit}, alpha {alpha} (down_proj {alpha if args.alpha_down is None else args.alpha_down}), kept fp32 {DEFAULT_KEEP_FP32['int8-token']}, "
          f"{min(args.batches, len(feeds)) * 16} calibration pairs; local relative error per quantized MatMul")
    layer, row = 2 if "first_layer" in DEFAULT_KEEP_FP32["int8-token"] else 1, []
    for node in nodes:
        w = weights[node.name]
        x = np.concatenate(captured[node.input[0]]).astype(np.float64)
        reference = x @ w
        error = np.linalg.norm(quantize_rows(x) @ quantize_columns(w) - reference) / np.linalg.norm(reference)
        kind = "down" if w.shape[0] == intermediate else "gate/up" if w.shape[1] == intermediate else \
            f"{w.shape[0]}x{w.shape[1]}"
        row.append(f"{kind} {error:.4f}")
        if args.decompose and kind == "down":
            grouped = np.concatenate([quantize_rows(x[:, g:g + 128]) for g in range(0, x.shape[1], 128)], 1)
            parts = {"x only": quantize_rows(x) @ w, "w only": x @ quantize_columns(w),
                     "x per 128": grouped @ quantize_columns(w)}
            row.append(" ".join(f"({name} {np.linalg.norm(v - reference) / np.linalg.norm(reference):.4f})"
                                for name, v in parts.items()))
        if w.shape[0] == intermediate:
            print(f"layer {layer:>2}: " + "  ".join(row))
            layer, row = layer + 1, []


if __name__ == "__main__":
    main()
