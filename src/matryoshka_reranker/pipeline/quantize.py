"""Quantized copies of exported models (ONNX Runtime's quantization tools), keeping what ranking needs in fp32.

Schemes (``export.quantize``):

* ``int8``: dynamic int8 quantization of the decoder's MatMuls (``quantize_dynamic``: int8 weights per
  output channel, activations quantized per batch at run time), with the score heads and the
  projections whose activations carry outliers left in fp32 (``keep_fp32``, e.g. ``down_proj``:
  the MLP's output projection, where a few channels reach 100x the median and a per-tensor
  activation scale flattens everything else).
* ``int8-weight-only`` / ``int4``: weight-only block quantization (``MatMulNBits``, 8 or 4 bits,
  blocks of 32 along K, symmetric); activations stay fp32, so outliers survive.

What each scheme costs and gives on the real model is measured by ``benchmarks/bench_quantize.py``
(Spearman against the fp32 scores per query, nDCG@10, speed) and reported in docs/export.md.
The quantized graph is a plain file of its own (no shared or hard-linked weights), so standard ONNX
tools open it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SCHEMES = ("int8", "int8-weight-only", "int4")
DEFAULT_KEEP_FP32 = ("score_heads", "down_proj")


def _matmuls_to_keep(model_path: Path, keep_fp32: Sequence[str]) -> list[str]:
    """Names of the MatMul nodes to leave in fp32, found by the shape of their weight.

    After export and constant folding the weights have generic names, so parts are recognised
    structurally: ``score_heads`` = a (hidden, 1) weight; ``down_proj`` = the MLP output projection,
    the (intermediate, hidden) weights (the largest input dimension among the MatMul weights);
    ``all_mlp`` = every weight touching the intermediate dimension (gate, up and down).
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and len(shapes.get(node.input[1], [])) == 2:
            weights[node.name] = shapes[node.input[1]]
    if not weights:
        return []
    intermediate = max(dims[0] for dims in weights.values())
    rules = {
        "score_heads": lambda d: d[1] == 1,
        "down_proj": lambda d: d[0] == intermediate and d[1] != 1,
        "all_mlp": lambda d: intermediate in d and d[1] != 1,
    }
    unknown = [k for k in keep_fp32 if k not in rules]
    if unknown:
        raise ValueError(f"keep_fp32: unknown part(s) {unknown}; known: {sorted(rules)}")
    return [name for name, dims in weights.items() if any(rules[k](dims) for k in keep_fp32)]


def quantize_model(source: Path, target: Path, scheme: str, keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> dict:
    """Writes a quantized copy of ``source`` (an .onnx with external data) to ``target`` (+ .data)."""
    import onnx

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    # The exported graph opens as it lies (format 3: weights beside it, one link). It is given to the
    # quantizer loaded, not by path: with a path, quantize_dynamic writes a "-inferred" copy beside
    # the source, an unlisted file in a verified folder while it runs.
    keep = _matmuls_to_keep(source, keep_fp32)
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(onnx.load(str(source)), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            MatMulNBitsQuantizer,
        )

        model = onnx.load(str(source))
        quantizer = MatMulNBitsQuantizer(model, bits=4 if scheme == "int4" else 8, block_size=32,
                                         is_symmetric=True, accuracy_level=4, nodes_to_exclude=keep)
        quantizer.process()
        onnx.save(quantizer.model.model, str(target), save_as_external_data=True,
                  location=target.name + ".data", size_threshold=1024)
    return {"scheme": scheme, "kept_fp32": list(keep_fp32), "nodes_kept_fp32": len(keep)}
