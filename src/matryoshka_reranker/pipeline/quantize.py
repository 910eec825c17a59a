"""Quantized copies of exported models (ONNX Runtime's quantization tools), keeping what ranking needs in fp32.

Schemes (``export.quantize``):

* ``int8``: dynamic int8 quantization of the decoder's MatMuls (``quantize_dynamic``: int8 weights per
  output channel, activations quantized per batch at run time), with the score heads and the
  projections whose activations carry outliers left in fp32 (``keep_fp32``, e.g. ``down_proj``:
  the MLP's output projection, where a few channels reach 100x the median and a per-tensor
  activation scale flattens everything else).
* ``int8-token``: int8 weights per output channel as above, but each *token's* activations get
  their own scale and zero point (asymmetric uint8 per row), computed in the graph at run time from
  standard ONNX ops around ``MatMulInteger``. ``quantize_dynamic`` uses one scale for the whole
  activation tensor (every token of every pair in the batch), and a few tokens of a Llama-family
  model carry values 50-500x the typical one, so most tokens keep only two or three levels: that,
  not the weights, is what costs ``int8`` its ranking agreement (measured in docs/export.md).
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

SCHEMES = ("int8", "int8-token", "int8-weight-only", "int4")
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
    elif scheme == "int8-token":
        model = onnx.load(str(source))
        quantized = per_token_int8(model, keep)
        onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data", size_threshold=1024)
        return {"scheme": scheme, "kept_fp32": list(keep_fp32), "nodes_kept_fp32": len(keep), "nodes_quantized": quantized}
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


def per_token_int8(model, keep: Sequence[str] = ()) -> int:
    """Rewrites ``model`` in place: every MatMul ``x @ W`` with a constant 2-D ``W`` (except the
    nodes named in ``keep``) becomes an int8 GEMM with per-token activation scales; returns how many.

    For x of shape (..., K) and W (K, N), per row r of x (one token)::

        lo, hi  = min(x_r, 0), max(x_r, 0)          # (..., 1)
        a_r     = (hi - lo) / 255,  z_r = round(-lo / a_r)
        q_r     = clip(round(x_r / a_r) + z_r, 0, 255)           uint8
        W_q     = round(W / w),  w = max|W[:, n]| / 127          int8, per output column n
        x @ W  ~= (MatMulInteger(q, W_q) - z_r * colsum(W_q)) * a_r * w

    The zero point is per row, which ``MatMulInteger`` does not take for a batched input, so it is
    subtracted afterwards through the weight's column sums (exact integer arithmetic up to the
    float32 cast). An input shared by several MatMuls (q/k/v, gate/up) is quantized once.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    skip = set(keep)
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[1] != 1]
    if not targets:
        return 0
    consts = {"axes": np.array([-1], np.int64), "zero": np.array(0.0, np.float32),
              "u8_max": np.array(255.0, np.float32), "eps": np.array(1e-12, np.float32)}
    prefix = "ptq"
    graph.initializer.extend(numpy_helper.from_array(v, f"{prefix}/{k}") for k, v in consts.items())
    c = {k: f"{prefix}/{k}" for k in consts}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    new_nodes: dict[int, list] = {}  # position of the first consumer -> nodes to insert before it
    order = {id(n): i for i, n in enumerate(graph.node)}
    for number, node in enumerate(targets):
        x, weight_name = node.input[0], node.input[1]
        at = order[id(node)]
        added = new_nodes.setdefault(at, [])
        if x not in quantized_inputs:  # per-token uint8 of x, once per input tensor
            t = f"{prefix}/x{len(quantized_inputs)}"
            added += [
                helper.make_node("ReduceMin", [x, c["axes"]], [t + "/min"], keepdims=1),
                helper.make_node("ReduceMax", [x, c["axes"]], [t + "/max"], keepdims=1),
                helper.make_node("Min", [t + "/min", c["zero"]], [t + "/lo"]),
                helper.make_node("Max", [t + "/max", c["zero"]], [t + "/hi"]),
                helper.make_node("Sub", [t + "/hi", t + "/lo"], [t + "/range"]),
                helper.make_node("Div", [t + "/range", c["u8_max"]], [t + "/scale0"]),
                helper.make_node("Max", [t + "/scale0", c["eps"]], [t + "/scale"]),
                helper.make_node("Div", [t + "/lo", t + "/scale"], [t + "/neg_zp"]),
                helper.make_node("Neg", [t + "/neg_zp"], [t + "/zp_f"]),
                helper.make_node("Round", [t + "/zp_f"], [t + "/zp"]),
                helper.make_node("Div", [x, t + "/scale"], [t + "/scaled"]),
                helper.make_node("Round", [t + "/scaled"], [t + "/rounded"]),
                helper.make_node("Add", [t + "/rounded", t + "/zp"], [t + "/shifted"]),
                helper.make_node("Clip", [t + "/shifted", c["zero"], c["u8_max"]], [t + "/clipped"]),
                helper.make_node("Cast", [t + "/clipped"], [t + "/q"], to=TensorProto.UINT8),
            ]
            quantized_inputs[x] = (t + "/q", t + "/scale", t + "/zp")
        q, scale, zp = quantized_inputs[x]
        w = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0  # (N,)
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        m = f"{prefix}/mm{number}"
        graph.initializer.extend([numpy_helper.from_array(w_q, m + "/w_q"),
                                  numpy_helper.from_array(w_scale.astype(np.float32), m + "/w_scale"),
                                  numpy_helper.from_array(w_q.astype(np.float32).sum(axis=0), m + "/colsum")])
        added += [
            helper.make_node("MatMulInteger", [q, m + "/w_q"], [m + "/acc"], name=m),
            helper.make_node("Cast", [m + "/acc"], [m + "/acc_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [zp, m + "/colsum"], [m + "/zp_term"]),
            helper.make_node("Sub", [m + "/acc_f", m + "/zp_term"], [m + "/centred"]),
            helper.make_node("Mul", [m + "/centred", scale], [m + "/by_row"]),
            helper.make_node("Mul", [m + "/by_row", m + "/w_scale"], [node.output[0]]),
        ]
    replaced = {id(n) for n in targets}
    nodes = []
    for i, n in enumerate(graph.node):
        nodes += new_nodes.get(i, [])
        if id(n) not in replaced:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(targets)
