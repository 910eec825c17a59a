"""Quantized copies of exported models (ONNX Runtime's quantization tools), keeping what ranking needs in fp32.

Schemes (``export.quantize``):

* ``int8``: dynamic int8 quantization of the decoder's MatMuls (``quantize_dynamic``: int8 weights per
  output channel, activations quantized per batch at run time), with the score heads and the
  projections whose activations carry outliers left in fp32 (``keep_fp32``, e.g. ``down_proj``:
  the MLP's output projection, where a few channels reach 100x the median and a per-tensor
  activation scale flattens everything else).
* ``int8-token``: int8 weights per output channel as above, but each *token's* activations get
  their own scale (uint8 around the row's centre), computed in the graph at run time, feeding ONNX
  Runtime's fused ``MatMulIntegerToFloat``. ``quantize_dynamic`` uses one scale for the whole
  activation tensor (every token of every pair in the batch), and a few tokens of a Llama-family
  model carry values 50-500x the typical one, so most tokens keep only two or three levels: that,
  not the weights, is what costs ``int8`` its ranking agreement (measured in docs/export.md).
* Smoothing (``smoothing``, SmoothQuant's alpha) for both activation schemes: within a token a few
  *channels* reach thousands of times the median one; per-channel factors taken on calibration
  pairs move that range into the weights, folded into the preceding RMSNorm weight or up_proj
  columns where possible, so it costs nothing at run time.
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
# int8 (one activation scale per tensor) loses the most in down_proj, whose input carries the largest
# outliers; int8-token (a scale per token) keeps the first decoder layer in fp32: measured the most
# useful part per FLOP (docs/export.md: exit 8 0.971 -> 0.983, exit 30 0.954 -> 0.973 Spearman on
# tuning queries, at 1/8 and 1/30 of the GEMM work); the weight-only schemes need nothing kept.
DEFAULT_KEEP_FP32 = {"int8": ("score_heads", "down_proj"), "int8-token": ("score_heads", "first_layer"),
                     "int8-weight-only": ("score_heads",), "int4": ("score_heads",)}


def _matmuls_to_keep(model_path: Path, keep_fp32: Sequence[str]) -> list[str]:
    """Names of the MatMul nodes to leave in fp32, found by the shape of their weight.

    After export and constant folding the weights have generic names, so parts are recognised
    structurally: ``score_heads`` = a (hidden, 1) weight; ``down_proj`` = the MLP output projection,
    the (intermediate, hidden) weights (the largest input dimension among the MatMul weights);
    ``all_mlp`` = every weight touching the intermediate dimension (gate, up and down); ``all`` =
    every projection. A part may name decoder layers, ``down_proj@25-30`` or ``all@1`` (1-based,
    inclusive; layers counted in graph order, each ending at its down_proj); ``first_layer`` is
    ``all@1``.
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
    layer_of, layer = {}, 1  # decoder layer of each projection: graph order, a layer ends at its down_proj
    for name, dims in weights.items():
        if dims[1] != 1:
            layer_of[name] = layer
            layer += dims[0] == intermediate
    rules = {
        "score_heads": lambda name, d: d[1] == 1,
        "down_proj": lambda name, d: d[0] == intermediate and d[1] != 1,
        "all_mlp": lambda name, d: intermediate in d and d[1] != 1,
        "all": lambda name, d: d[1] != 1,
    }
    chosen = []
    for part in keep_fp32:
        kind, _, span = ("all@1" if part == "first_layer" else part).partition("@")
        if kind not in rules or (span and kind == "score_heads"):
            raise ValueError(f"keep_fp32: unknown part {part!r}; known: {sorted(rules)} and first_layer, "
                             "each optionally @a-b (decoder layers a..b)")
        layers = None
        if span:
            first, _, last = span.partition("-")
            try:
                layers = range(int(first), int(last or first) + 1)
            except ValueError:
                raise ValueError(f"keep_fp32: {part!r}: layers must read @a or @a-b (1-based)") from None
            if not layers or layers.start < 1:
                raise ValueError(f"keep_fp32: {part!r}: layers must read @a or @a-b with 1 <= a <= b")
        chosen.append((rules[kind], layers))
    return [name for name, dims in weights.items()
            if any(rule(name, dims) and (layers is None or layer_of.get(name) in layers) for rule, layers in chosen)]


def quantize_model(source: Path, target: Path, scheme: str, keep_fp32: Sequence[str] | None = None,
                   calibration: Sequence[dict] = (), smoothing: float = 0.0) -> dict:
    """Writes a quantized copy of ``source`` (an .onnx with external data) to ``target`` (+ .data).

    ``keep_fp32``: parts left in fp32 (None: the scheme's default, ``DEFAULT_KEEP_FP32``).
    ``smoothing``: SmoothQuant's alpha for the schemes that quantize activations (0 = off), from
    per-channel maxima over ``calibration`` (ONNX feed dicts); ignored by weight-only schemes.
    """
    import onnx

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    keep_fp32 = DEFAULT_KEEP_FP32[scheme] if keep_fp32 is None else tuple(keep_fp32)
    keep_fp32 = keep_fp32 if "score_heads" in keep_fp32 else ("score_heads", *keep_fp32)  # never quantized
    # The exported graph opens as it lies (format 3: weights beside it, one link). It is given to the
    # quantizer loaded, not by path: with a path, quantize_dynamic writes a "-inferred" copy beside
    # the source, an unlisted file in a verified folder while it runs.
    keep = _matmuls_to_keep(source, keep_fp32)
    model = onnx.load(str(source))
    info = {"scheme": scheme, "kept_fp32": list(keep_fp32), "nodes_kept_fp32": len(keep)}
    if smoothing and scheme in ("int8", "int8-token"):
        if not calibration:
            raise ValueError(f"{scheme} with smoothing {smoothing} needs calibration batches")
        info["smoothing"] = {"alpha": smoothing, "inputs": smooth(model, channel_maxima(model, calibration, keep),
                                                                  smoothing, keep),
                             "calibration_batches": len(calibration)}
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        _follow_umask(target)
        return info
    if scheme == "int8-token":
        info["nodes_quantized"] = per_token_int8(model, keep)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            MatMulNBitsQuantizer,
        )

        quantizer = MatMulNBitsQuantizer(model, bits=4 if scheme == "int4" else 8, block_size=32,
                                         is_symmetric=True, accuracy_level=4, nodes_to_exclude=keep)
        quantizer.process()
        model = quantizer.model.model
    onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data", size_threshold=1024)
    _follow_umask(target)
    return info


def _follow_umask(target: Path) -> None:
    """onnx creates the external data file 0600 (ONNX Runtime's quantizers save through it): the copy's
    files get the permissions the user's umask gives, as every other written artifact (core/atomic.py)."""
    import os

    from ..core.atomic import _umask

    for path in (target, target.with_name(target.name + ".data")):
        if path.exists():
            os.chmod(path, 0o666 & ~_umask())


def per_token_int8(model, keep: Sequence[str] = ()) -> int:
    """Rewrites ``model`` in place: every MatMul ``x @ W`` with a constant 2-D ``W`` (except the
    nodes named in ``keep``) becomes an int8 GEMM with per-token activation scales; returns how many.

    For x of shape (..., K) and W (K, N), per row r of x (one token)::

        a_r    = max((max x_r - min x_r) / 253, |c_r| / 127, 1e-12)    (..., 1), c_r the row's middle
        z_r    = round(c_r / a_r)                                      the centre, in whole steps: |z_r| <= 127
        q_r    = round(x_r / a_r) + (128 - z_r)                        uint8, in [1, 255]
        W_q    = round(W / w),  w = max|W[:, n]| / 127                  int8, per output column n
        x @ W ~= MatMulIntegerToFloat(q, W_q, a_r, w, 128) + z_r a_r * colsum(W_q w)

    ``MatMulIntegerToFloat`` (ONNX Runtime's com.microsoft domain; the op its own quantization
    fusions produce) runs the u8 x s8 GEMM and applies the column scales in one kernel, and the row
    scales in place on its output, in a pass after the GEMM (ONNX Runtime's CPU kernel broadcasts an
    A scale of shape (..., 1) over the output; its schema documents only scalar or per-column A
    scales, so tests/test_quantize.py pins this against the numpy arithmetic). It takes a zero point
    per tensor only, not per row: so the row is quantized around its own centre with the fixed zero
    point 128, and the centre's contribution is added back through the weights' column sums. The
    centre is a whole number of steps so that 0 stays on the grid: near-zero values then round to
    exactly 0, where an off-grid centre gives them all the same offset, which adds up along K
    (measured: worse ranking agreement). Not int8 activations: ONNX Runtime's CPU GEMM has a fast
    u8 x s8 kernel on AVX2 but not s8 x s8 (~9x slower, measured). An input shared by several
    MatMuls (q/k/v, gate/up) is quantized once.

    Why this form: the quantization is one standard per-axis ``QuantizeLinear`` over the rows (row
    scales and zero points ``128 - z_r`` computed at run time): besides the two reductions, one pass
    over the input where Div, Round, Add and Cast took four; and the row scale needs no node of its
    own. That needs the zero point in uint8, hence ``|z_r| <= 127``: the floor ``|c_r| / 127`` on the
    step. A row with values of both signs (every decoder input measured) has ``|c_r| <= range / 2``,
    so the floor never binds there and the arithmetic is that of the plain 253-step grid; only a row
    whose middle is far from 0 (``|c_r| > 127/253 range``: one sign, away from 0) gets a coarser step,
    ``253 |c_r| / (127 range)`` times the plain one (a constant row stays exact up to rounding: it
    sits on its centre).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = _quantizable(model, keep)
    if not targets:
        return 0
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    consts = {"axes": np.array([-1], np.int64), "flat": np.array([-1], np.int64),
              "eps": np.array(1e-12, np.float32), "shift": np.array(128.0, np.float32),
              "zp": np.array(128, np.uint8), "half": np.array(0.5, np.float32),
              "steps": np.array(253.0, np.float32), "centre_steps": np.array(127.0, np.float32)}
    prefix = "ptq"
    graph.initializer.extend(numpy_helper.from_array(v, f"{prefix}/{k}") for k, v in consts.items())
    c = {k: f"{prefix}/{k}" for k in consts}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    new_nodes: dict[int, list] = {}  # position of the first consumer -> nodes to insert before it
    order = {id(n): i for i, n in enumerate(graph.node)}
    for number, node in enumerate(targets):
        x, weight_name = node.input[0], node.input[1]
        k_dim = int(inits[weight_name].dims[0])
        added = new_nodes.setdefault(order[id(node)], [])
        if x not in quantized_inputs:  # per-token uint8 of x, once per input tensor
            t = f"{prefix}/x{len(quantized_inputs)}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, k_dim], np.int64), t + "/rows"))
            added += [  # per row: (..., 1)
                helper.make_node("ReduceMax", [x, c["axes"]], [t + "/max"], keepdims=1),
                helper.make_node("ReduceMin", [x, c["axes"]], [t + "/min"], keepdims=1),
                helper.make_node("Sub", [t + "/max", t + "/min"], [t + "/range"]),
                helper.make_node("Div", [t + "/range", c["steps"]], [t + "/step"]),
                helper.make_node("Add", [t + "/max", t + "/min"], [t + "/sum"]),
                helper.make_node("Mul", [t + "/sum", c["half"]], [t + "/mid"]),
                helper.make_node("Abs", [t + "/mid"], [t + "/abs_mid"]),
                helper.make_node("Div", [t + "/abs_mid", c["centre_steps"]], [t + "/floor"]),
                helper.make_node("Max", [t + "/step", t + "/floor", c["eps"]], [t + "/scale"]),
                helper.make_node("Div", [t + "/mid", t + "/scale"], [t + "/mid_steps"]),
                helper.make_node("Round", [t + "/mid_steps"], [t + "/zc"]),  # centre, in whole steps
                helper.make_node("Mul", [t + "/zc", t + "/scale"], [t + "/centre"]),
                helper.make_node("Sub", [c["shift"], t + "/zc"], [t + "/zp_float"]),
                helper.make_node("Cast", [t + "/zp_float"], [t + "/zp"], to=TensorProto.UINT8),
                # the rows as one (rows, K) matrix, quantized per row (axis 0), then back to x's shape
                helper.make_node("Reshape", [x, t + "/rows"], [t + "/x_rows"]),
                helper.make_node("Reshape", [t + "/scale", c["flat"]], [t + "/scale_rows"]),
                helper.make_node("Reshape", [t + "/zp", c["flat"]], [t + "/zp_rows"]),
                helper.make_node("QuantizeLinear", [t + "/x_rows", t + "/scale_rows", t + "/zp_rows"], [t + "/q_rows"],
                                 axis=0),
                helper.make_node("Shape", [x], [t + "/shape"]),
                helper.make_node("Reshape", [t + "/q_rows", t + "/shape"], [t + "/q"]),
            ]
            quantized_inputs[x] = (t + "/q", t + "/scale", t + "/centre")
        q, scale, centre = quantized_inputs[x]
        w = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0  # (N,)
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        m = f"{prefix}/mm{number}"
        # x @ W = (x - c) @ W + c * colsum(W), with the dequantized weight's column sums
        colsum = (w_q.astype(np.float32).sum(axis=0) * w_scale).astype(np.float32)
        graph.initializer.extend([numpy_helper.from_array(w_q, m + "/w_q"),
                                  numpy_helper.from_array(w_scale.astype(np.float32), m + "/w_scale"),
                                  numpy_helper.from_array(colsum, m + "/colsum")])
        added += [
            helper.make_node("MatMulIntegerToFloat", [q, m + "/w_q", scale, m + "/w_scale", c["zp"]],
                             [m + "/scaled"], name=m, domain="com.microsoft"),
            helper.make_node("Mul", [centre, m + "/colsum"], [m + "/shift"]),
            helper.make_node("Add", [m + "/scaled", m + "/shift"], [node.output[0]]),
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


def channel_maxima(model, feeds: Sequence[dict], keep: Sequence[str] = ()) -> dict:
    """{input name: max |x_k| per channel k} for every MatMul input ``per_token_int8`` would
    quantize, over the calibration batches ``feeds`` (ONNX Runtime, CPU)."""
    import copy

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = list(dict.fromkeys(n.input[0] for n in _quantizable(model, keep)))
    probe = copy.deepcopy(model)
    probe.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in inputs})):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smooth(model, maxima: dict, alpha: float, keep: Sequence[str] = ()) -> int:
    """SmoothQuant: ``x @ W = (x / s) @ (diag(s) W)`` with ``s_k = max|x_k|^alpha / max|W_k|^(1-alpha)``,
    moving the few activation channels with values thousands of times the median into the weights
    (whose per-column int8 has room to spare: weights alone quantized keep Spearman 0.998 at exit
    30, measured). Rewrites ``model`` in place, returns how many inputs were smoothed.

    ``1 / s`` is folded where it costs nothing at run time: into the constant of the Mul that makes
    ``x`` (an RMSNorm weight, for q/k/v and gate/up), or into the columns of the MatMul whose output
    is multiplied into ``x`` (up_proj, for down_proj's input ``SiLU(gate) * up``); elsewhere (the
    attention output, o_proj's input) a Mul by ``1 / s`` is inserted.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    uses = {name: len(nodes) for name, nodes in consumers.items()}
    targets: dict[str, list] = {}
    for node in _quantizable(model, keep):
        targets.setdefault(node.input[0], []).append(node)
    inserted: dict[str, object] = {}  # first consumer's name -> Mul to put before it
    for x, nodes in targets.items():
        if x not in maxima:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.maximum(maxima[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        for node, w in zip(nodes, weights):
            weight = node.input[1]
            readers = sum(n.input[1] == weight for n in nodes)
            if uses[weight] > readers:  # also read with another input (a compression layer's recomputed
                # k_proj): these MatMuls get a smoothed copy of their own, the others keep the weight as it is
                uses[weight] -= readers
                copy = f"smooth/w{len(graph.initializer)}"
                graph.initializer.append(numpy_helper.from_array(w * s[:, None], copy))
                inits[copy] = graph.initializer[-1]
                uses[copy] = readers
                for n in nodes:
                    if n.input[1] == weight:
                        n.input[1] = copy
            else:
                inits[weight].CopyFrom(numpy_helper.from_array(w * s[:, None], weight))
        if not _fold_into_producer(x, 1.0 / s, producers, consumers, uses, inits, len(nodes)):
            name = f"smooth/{len(inserted)}"
            graph.initializer.append(numpy_helper.from_array(1.0 / s, name + "/inverse"))
            inserted[nodes[0].name] = helper.make_node("Mul", [x, name + "/inverse"], [name + "/x"])
            for node in nodes:
                node.input[0] = name + "/x"
    if inserted:
        ordered = []
        for n in graph.node:
            if n.name in inserted:
                ordered.append(inserted[n.name])
            ordered.append(n)
        del graph.node[:]
        graph.node.extend(ordered)
    return sum(1 for x in targets if x in maxima)


def _fold_into_producer(x, factor, producers, consumers, uses, inits, matmuls: int) -> bool:
    """Multiplies ``x``'s channels by ``factor`` inside the node that makes it, if that is free and
    changes nothing else (``x`` feeds only the MatMuls being smoothed; the constant feeds only that node)."""
    import numpy as np
    from onnx import numpy_helper

    node = producers.get(x)
    if node is None or node.op_type != "Mul" or len(consumers.get(x, [])) != matmuls:
        return False
    for operand in node.input:  # RMSNorm: h * gamma, gamma a (K,) constant
        t = inits.get(operand)
        if t is not None and list(t.dims) == [factor.size] and uses.get(operand) == 1:
            value = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array((value * factor).astype(np.float32), operand))
            return True
    for operand in node.input:  # SiLU(gate) * up: scale up_proj's output columns
        up = producers.get(operand)
        if (up is not None and up.op_type == "MatMul" and uses.get(operand) == 1 and up.input[1] in inits
                and list(inits[up.input[1]].dims)[-1:] == [factor.size] and uses.get(up.input[1]) == 1):
            value = numpy_helper.to_array(inits[up.input[1]]).astype(np.float32)
            inits[up.input[1]].CopyFrom(numpy_helper.from_array((value * factor).astype(np.float32), up.input[1]))
            return True
    return False


def _quantizable(model, keep: Sequence[str] = ()) -> list:
    """The MatMul nodes ``per_token_int8`` rewrites: a constant 2-D weight that is not a score head."""
    inits = {t.name: t for t in model.graph.initializer}
    skip = set(keep)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[1] != 1]
