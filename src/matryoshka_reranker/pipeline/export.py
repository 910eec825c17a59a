"""ONNX export: one standalone model per (exit layer, compression ratio), checked against PyTorch.

Each configuration ``exit-{k:02d}_ratio-{r}`` runs decoder layers 1..k (compressing passage tokens
at the configured layers when r > 1) with the adapters of ratio r merged, and outputs one score
per row. How it is built, and why:

* **One torch export per ratio, not per exit.** A dynamo export of SmolLM2 costs ~30-60 s on two
  cores, so we export once per ratio a graph that outputs the scores of *every* exit (and, for the
  checks below, the deepest exit's hidden states) and cut one model per exit out of it: exit k's
  model is the part of the graph its ``scores`` output depends on, i.e. layers 1..k and head k.
  Every cut model is then checked against PyTorch on its own.
* **Shared weights, one folder per ratio.** The graph's initializers go to one external-data file
  per ratio, ``ratio-<r>/weights.bin``; each exit's graph (``exit-08.onnx``, ...) and the ratio's
  ``all-exits.onnx`` sit beside it and reference the tensors they use (a shallow exit reads only
  its layers). So a ratio costs one full model on disk, in DVC's cache and in a download, and every
  graph is a standard ONNX model with external data in its own folder: onnx's checker refuses
  weights that are hard-linked, symlinked or outside the model's folder (format 2 hard-linked one
  file into a folder per exit, which ``onnx.load`` refused in the working tree). DVC must then not
  check the file out as a hard link either (``.dvc/config``: ``cache.type = reflink,copy``).
  ``share_weights=False`` writes a ``.data`` file per graph with only that graph's tensors instead.
* **Parity.** Each model is scored by ONNX Runtime on a fixed validation batch (5 ragged pairs at
  batch size 5, and each pair alone) and compared with the PyTorch model; export fails if the max
  abs difference exceeds the tolerance (1e-4 for float32). With right padding and causal
  attention the last real token never attends to padding, so scores alone cannot show that the
  graph kept its *causal* mask at exit 1 or the mask-dependent positions after compression: the
  shared graph also outputs the deepest exit's final-norm'd hidden state of *every* real token,
  which must match PyTorch too (a token that could see its right neighbours would differ).
* **Attention.** The exported copy uses transformers' ``eager`` attention (explicit matmul +
  additive mask + softmax, which ``MatryoshkaModel`` always feeds a causal mask); see
  ``benchmarks/bench_onnx.py`` for the eager-vs-sdpa measurement. PyTorch references keep the
  model's own attention.

Configurations where compression cannot apply (ratio r > 1 and exit k <= every compression layer:
compressing "at c" only changes the layers after c) are still exported, without the length inputs
and with ``compression.applied_layers: []`` in the manifest: ratio r's adapters change the scores
at every exit, so ``exit-08_ratio-2`` is a model of its own (what a user who picked ratio 2 gets
at exit 8), the evaluation, gate and release expect the full ``exit_layers x ratios`` grid, and
cutting it from the ratio's shared graph costs ~1 s.

fp16 (``dtype="float16"``, for GPU serving): the model is exported in half precision (scores
output stays float32) and compared with the float32 PyTorch scores under ``fp16_tolerance``. The
check runs on the CUDA provider when it works here, else on ONNX Runtime's CPU provider, which
runs float16 graphs by inserting casts to float32 around ops it has no float16 kernel for (so on
CPU the check measures the half-precision weights and activations at those ops, not every op).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import FLOAT32_ONLY_QUANTIZE
from ..core.atomic import atomic_dir, write_json
from ..core.errors import CheckFailed
from ..model.inputs import InputFormat, PairEncoder, resolve_format
from ..serving.artifacts import (
    ALL_EXITS_FILE,
    FORMAT_VERSION,
    LENGTH_INPUTS,
    MANIFEST,
    MODEL_CARD,
    MODEL_FILE,
    SCORES,
    SPECIALIST,
    TOKEN_INPUTS,
    WEIGHTS_FILE,
    ExportedConfig,
    adapter_sha256,
    config_name,
    exit_model_file,
    folder_files,
    ratio_folder,
    write_index,
)
from .calibration import CalibrationSet, calibration_set, fit_platt
from .model_card import ratio_card

log = logging.getLogger(__name__)

HIDDEN = "hidden"  # debug output of the shared graph only: (B, T', D) final-norm'd, padding zeroed
LAST_SCORES = "last_scores"  # shared graph only: exit k with layer k run for the last tokens (exit k's graph)
DEBUG_GRAPH = ".all-exits-debug.onnx"  # the torch export with the hidden-state output; removed after the checks
WEIGHTS_ALIGNMENT = 65536  # large tensors start on 64 KiB offsets (memory-mappable)

# Fixed validation pairs: ragged lengths, a passage cut by max_length, a one-word passage.
VALIDATION_PAIRS = [
    ("what causes the common cold?",
     "Rhinoviruses cause most colds in adults and children; they spread by hands and droplets."),
    ("capital of France", "Paris is the capital of France."),
    ("vitamin D and bone health",
     "Sunlight helps the skin make vitamin D. Deficiency is associated with bone loss in older adults, "
     "and supplements reduce fracture risk in some trials but not in others. " * 12),
    ("q", "x"),
    ("Do stem cells differentiate in vitro on 0-dimensional biomaterials?",
     "0-dimensional biomaterials lack inductive properties, yet stem cells differentiate in vitro."),
]


class ExportError(CheckFailed):
    """An export could not be produced or failed its checks; nothing was written."""


@dataclass(frozen=True)
class ExportConfig:
    exit_layer: int
    ratio: int
    compress_layers: tuple[int, ...]  # the configured layers (ratio 1: none applies)
    variant: str | None = None  # "specialist": an exit specialist's own model (training/specialist.py)

    @property
    def name(self) -> str:
        return config_name(self.exit_layer, self.ratio, self.variant)

    @property
    def applied_layers(self) -> tuple[int, ...]:
        """Compression layers that change this exit's score: c < k, and only when r > 1."""
        return tuple(c for c in self.compress_layers if c < self.exit_layer) if self.ratio > 1 else ()

    @property
    def input_names(self) -> list[str]:
        return TOKEN_INPUTS + (LENGTH_INPUTS if self.applied_layers else [])


@dataclass
class ExportOptions:
    opset: int = 18
    dtype: str = "float32"  # or "float16" (GPU serving)
    dynamo: bool = True
    attn_implementation: str = "eager"
    parity_tolerance: float = 1e-4  # float32
    fp16_tolerance: float = 5e-2
    share_weights: bool = True
    start_layer: int | None = None  # raw checkpoints only
    layer_sep: int | None = None
    input_format: InputFormat | None = None  # None: the one saved with the adapters (defaults for a raw model)
    source_model: str = ""
    params_fingerprint: str | None = None
    calibration: CalibrationSet | None = None  # labelled pairs: Platt (a, b) per config (calibration.py)
    quantize: tuple[str, ...] = ()  # quantized copies per config: int8 | int8-token | int8-weight-only | int4 (quantize.py)
    quantize_keep_fp32: tuple[str, ...] | None = None  # MatMuls left in fp32; None: per scheme (quantize.py)
    quantize_smoothing: float = 0.0  # SmoothQuant alpha for int8 / int8-token, from ``quantize_pairs``
    quantize_pairs: tuple[tuple[str, str], ...] = ()  # the quantizer's activation statistics; () = VALIDATION_PAIRS
    data_dir: str | None = None  # what the model was trained on (the model card states its license)

    @property
    def tolerance(self) -> float:
        return self.fp16_tolerance if self.dtype == "float16" else self.parity_tolerance


def plan_configs(exit_layers: Sequence[int], ratios: Sequence[int], compress_layers: Sequence[int]
                 ) -> list[ExportConfig]:
    """Every (exit, ratio) configuration, ratio-major, shallow exits first."""
    layers = tuple(sorted(set(compress_layers)))
    configs = [ExportConfig(k, r, layers) for r in sorted(set(ratios)) for k in sorted(set(exit_layers))]
    for config in configs:
        if config.ratio > 1 and not config.applied_layers:
            log.info("%s: compression at layers %s comes after exit %d, so this config runs uncompressed "
                     "(with ratio %d's adapters)", config.name, list(layers), config.exit_layer, config.ratio)
    return configs


# ------------------------------------------------------------------ the whole release
def export_models(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    exit_layers: Sequence[int],
    ratios: Sequence[int] = (1,),
    compress_layers: Sequence[int] = (),
    adapters: Mapping[int, Sequence[str | os.PathLike]] | Callable[[int], Sequence] | None = None,
    options: ExportOptions | None = None,
    specialists: Mapping[int, str | os.PathLike] | None = None,
) -> dict:
    """Exports every configuration into ``out`` (replaced atomically) and returns ``index.json``.

    ``adapters`` gives the adapter stack merged for each ratio (a mapping or ``ratio -> paths``);
    the stacks' common prefix is merged once and the rest per ratio. ``specialists`` ({exit k: adapter
    folder}, ``training/specialist.py``): each becomes ``exit-KK-ratio-1-specialist``, its own folder: the
    ratio-1 stack merged, cut after layer k, the specialist merged (its weights differ from the shared ones).
    """
    from ..core.assets import load_tokenizer, resolve_model_path

    options = options or ExportOptions()
    if options.dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {options.dtype!r}")
    if options.attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be eager or sdpa, got {options.attn_implementation!r}")
    if options.opset < 18:
        raise ValueError(f"opset must be >= 18, got {options.opset}")
    if not exit_layers or not ratios:
        raise ValueError("nothing to export: exit_layers and ratios must not be empty")
    float32_only = [s for s in options.quantize if s in FLOAT32_ONLY_QUANTIZE]
    if options.dtype == "float16" and float32_only:  # they rewrite float32 graphs; ORT refused the result at the end
        raise ValueError(f"quantize {float32_only} needs dtype float32 (a float16 export can be quantized "
                         "int8-weight-only or int4)")
    configs = plan_configs(exit_layers, ratios, compress_layers)
    stacks = {r: [Path(p) for p in _stack(adapters, r)] for r in sorted({c.ratio for c in configs})}
    specialists = {int(k): Path(p) for k, p in sorted((specialists or {}).items())}
    if specialists and 1 not in stacks:
        raise ValueError("specialists are cut from the ratio-1 model: add 1 to the ratios")
    unexported = sorted(set(specialists) - {c.exit_layer for c in configs})
    if unexported:
        raise ValueError(f"specialists at {unexported}: not exported exits {sorted(set(exit_layers))}")
    missing = sorted({str(p) for stack in [*stacks.values(), specialists.values()] for p in stack
                      if not (p / "adapter_config.json").exists()})
    if missing:
        raise FileNotFoundError("adapter folder(s) missing (no adapter_config.json): " + ", ".join(missing))

    path = resolve_model_path(model_path)
    every_folder = [path, *dict.fromkeys(p for stack in [*stacks.values(), specialists.values()] for p in stack)]
    input_format = resolve_format(every_folder, options.input_format)  # the one the adapters were trained with
    options = dataclasses.replace(options, input_format=input_format)
    tokenizer = load_tokenizer(path)
    source = options.source_model or str(model_path)
    started = time.perf_counter()
    with atomic_dir(out) as tmp, torch.no_grad():
        common = _common_prefix(list(stacks.values()))
        base = _load_merged(path, tokenizer, common, options)
        base.check_cutoff_layers(sorted(set(exit_layers)))  # clear errors before the slow part
        base.check_compression(compress_layers, max(ratios))
        too_long = base.input_length_problem(input_format.encoder(tokenizer).longest)
        if too_long:
            raise ValueError(too_long)
        _save_tokenizer(tokenizer, tmp / ".tokenizer")
        listed = []
        for ratio, stack in stacks.items():
            rest = stack[len(common):]
            model = _merge(copy.deepcopy(base), rest, merged=common) if rest else base
            ratio_configs = [c for c in configs if c.ratio == ratio]
            listed += _export_ratio(model, ratio_configs, stack, tokenizer, tmp, options, source)
            del model
        floats = list(listed)
        for k, specialist in specialists.items():  # after the floats: quantized copies are of those only
            model = _merge(_load_merged(path, tokenizer, stacks[1], options).truncate(k), [specialist],
                           merged=stacks[1])
            config = ExportConfig(k, 1, (), variant=SPECIALIST)
            listed += _export_ratio(model, [config], [*stacks[1], specialist], tokenizer, tmp, options, source,
                                    folder_name=config.name)
            del model
        for scheme in options.quantize:  # quantized copies, evaluated and gated like the others
            for config in floats:
                name = config_name(config.exit_layer, config.ratio, scheme)
                _quantized_copy(config, tmp / name, scheme, options, tokenizer)
                listed.append(ExportedConfig(name, config.exit_layer, config.ratio, config.compress_layers, tmp / name,
                                             MODEL_FILE, variant=scheme))
        shutil.rmtree(tmp / ".tokenizer")
        all_exits = [{"ratio": r, "path": ratio_folder(r), "model_file": ALL_EXITS_FILE,
                      "exit_layers": sorted(c.exit_layer for c in configs if c.ratio == r),
                      "compress_layers": list(configs[0].compress_layers) if r > 1 else []} for r in stacks]
        index = write_index(tmp, listed, {"input_format": input_format.to_dict(), "all_exits": all_exits})
    log.info("exported %d configurations (%d shared-weight, the rest specialists and quantized copies) to %s in %.1f s",
             len(index["models"]), len(configs), out, time.perf_counter() - started)
    return index


def export_from_params(params) -> dict:
    """The pipeline stage: ``params.yaml`` -> ``paths.onnx`` (adapters from ``params.adapter_stack``)."""
    ex, m = params.export, params.model
    options = ExportOptions(
        opset=ex.opset, dtype=ex.dtype, dynamo=ex.dynamo, attn_implementation=ex.attn_implementation,
        parity_tolerance=ex.parity_tolerance, fp16_tolerance=ex.fp16_tolerance, share_weights=ex.share_weights,
        start_layer=m.start_layer, layer_sep=m.layer_sep,
        input_format=m.input_format,
        source_model=m.name_or_path, params_fingerprint=params.fingerprint(),
        calibration=_calibration_from_params(params),
        data_dir=params.data.train_file or params.data.beir_dir,
        quantize=tuple(ex.quantize), quantize_smoothing=ex.quantize_smoothing,
        quantize_pairs=quantization_pairs(params) if ex.quantize else (),
        quantize_keep_fp32=None if ex.quantize_keep_fp32 is None else tuple(ex.quantize_keep_fp32),
    )
    return export_models(m.name_or_path, params.paths.onnx, ex.exit_layers, ex.ratios, ex.compress_layers,
                         adapters=params.adapter_stack, options=options,
                         specialists={k: params.specialist_dir(k) for k in params.specialist.exits})


def quantization_pairs(params) -> tuple[tuple[str, str], ...]:
    """(query, passage) pairs for the quantizer's activation statistics (SmoothQuant's channel maxima): from
    the prepared *training* groups (``paths.train_groups``, file order), each query's first positive and first
    negatives, at most 4 pairs per query so that ``export.quantize_calibration_pairs`` spans many queries.
    Not the eval queries: the quantized configs are evaluated and gated on those, and statistics taken from
    them would let the test set shape the model it scores (until 2026-12-07 the Platt half of the eval
    queries was used, which the benchmarks then excluded by hand)."""
    from ..core.jsonl import read_jsonl

    count = params.export.quantize_calibration_pairs
    pairs: list[tuple[str, str]] = []
    for _, group in read_jsonl(params.paths.train_groups, "training groups"):
        passages = (group.get("pos") or [])[:1] + (group.get("neg") or [])
        pairs += [(group["query"], passage) for passage in passages[:4]]
        if len(pairs) >= count:
            break
    if len(pairs) < count:
        log.warning("only %d training pairs for the quantizer's activation statistics (export.quantize_calibration_pairs: "
                    "%d)", len(pairs), count)
    return tuple(pairs[:count])


def _calibration_from_params(params) -> CalibrationSet | None:
    """The calibration half of the eval queries (``export.calibration_queries`` of them), labelled by qrels."""
    if not params.export.calibration_queries:
        return None
    from .evaluation import load_eval_set

    queries, qrels = load_eval_set(params)
    return calibration_set(queries, qrels, params.export.calibration_queries)


def _stack(adapters, ratio: int) -> Sequence:
    if adapters is None:
        return []
    return adapters(ratio) if callable(adapters) else adapters.get(ratio, [])


def _common_prefix(stacks: list[list[Path]]) -> list[Path]:
    prefix = []
    for items in zip(*stacks):
        if any(p != items[0] for p in items):
            break
        prefix.append(items[0])
    return prefix


def _load_merged(path: Path, tokenizer, adapters: Sequence[Path], options: ExportOptions):
    from ..model.modeling import MatryoshkaModel

    model = MatryoshkaModel.from_pretrained(path, start_layer=options.start_layer, layer_sep=options.layer_sep,
                                            dtype=torch.float32, tokenizer=tokenizer)
    return _merge(model, adapters)


def _merge(model, adapters: Sequence[Path], merged: Sequence[Path] = ()):
    from ..model.adapters import merge_adapters

    return merge_adapters(model, adapters, merged).eval() if adapters else model


def _save_tokenizer(tokenizer, folder: Path) -> None:
    folder.mkdir()
    tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------ one ratio
class _AllExits(nn.Module):
    """What is exported once per ratio: scores at every exit, twice, and the deepest exit's hidden states.

    ``scores_k`` reads exit k off the full layer k that the deeper layers continue from (the all-exits
    graph: no work twice); ``last_scores_k`` runs layer k again for each row's last token only
    (``modeling.last_token_layer``), from the same input: exit k's own graph is cut from it, so it runs
    layer k for one token per row instead of all (1/k less work; 12% at exit 8).
    """

    def __init__(self, model, exits: Sequence[int], compress_layers: Sequence[int], ratio: int):
        super().__init__()
        self.model, self.exits = model, sorted(exits)
        self.compress_layers, self.ratio = tuple(compress_layers), ratio

    def forward(self, input_ids, attention_mask, query_lengths=None, prompt_lengths=None):
        model, compress = self.model, (self.compress_layers, self.ratio)
        state = model.embed(input_ids, attention_mask, query_lengths, prompt_lengths)
        scores, last_scores = {}, {}
        for depth in range(1, self.exits[-1] + 1):  # one layer per call: each exit branches off its layer's input
            if depth in self.exits:
                _, branch = model.advance(state, depth, {depth}, *compress, last_token_only=True)
                last_scores[depth] = branch[depth]
            state, found = model.advance(state, depth, {depth} & set(self.exits), *compress)
            scores.update(found)
        mask = state.attention_mask[..., None].to(state.hidden.dtype)  # (B, T', 1)
        hidden = model.decoder.norm(state.hidden).float() * mask  # (B, T', D), padding zeroed
        return (*[scores[k] for k in self.exits], *[last_scores[k] for k in self.exits], hidden)


@contextmanager
def _attention(model, implementation: str):
    config = model.decoder.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _export_ratio(model, configs: list[ExportConfig], adapters: list[Path], tokenizer, out: Path,
                  options: ExportOptions, source: str, folder_name: str | None = None) -> list[ExportedConfig]:
    """``out/ratio-<r>/`` (or ``out/<folder_name>``): every exit's graph and the all-exits graph beside one
    weights file, checked. The configs' ``variant`` (one for all) is the folder's."""
    import onnx_ir as ir

    ratio = configs[0].ratio
    exits = [c.exit_layer for c in configs]
    compress = configs[0].compress_layers if ratio > 1 else ()
    inputs = TOKEN_INPUTS + (LENGTH_INPUTS if any(c.applied_layers for c in configs) else [])
    encoder = options.input_format.encoder(tokenizer)
    batches = validation_batches(encoder)
    reference = [_reference(model, b, exits, compress, ratio) for b in batches]  # PyTorch float32

    variant = configs[0].variant
    folder = out / (folder_name or ratio_folder(ratio))
    folder.mkdir()
    weights = WEIGHTS_FILE if options.share_weights else None
    started = time.perf_counter()
    exported = model if options.dtype == "float32" else copy.deepcopy(model).half()
    wrapper = _AllExits(exported, exits, compress, ratio).eval()
    scratch = out / f".scratch-ratio-{ratio}"  # the TorchScript exporter's raw files, if it is used
    scratch.mkdir()
    with _attention(wrapper.model, options.attn_implementation):
        graph = _torch_export(wrapper, batches[0], inputs, [f"{SCORES}_{k}" for k in exits]
                              + [f"{LAST_SCORES}_{k}" for k in exits] + [HIDDEN], scratch, options)
    _optimize(graph)
    shared = folder / DEBUG_GRAPH
    ir.save(graph, shared, external_data=weights or DEBUG_GRAPH + ".data", size_threshold_bytes=1024,
            alignment=WEIGHTS_ALIGNMENT)
    del graph, wrapper
    shutil.rmtree(scratch)
    log.info("ratio %d: exported exits %s in %.1f s", ratio, exits, time.perf_counter() - started)

    hidden_diff = _check_hidden(shared, batches, reference, inputs, options)
    calibrations = _calibrate(shared, exits, encoder, inputs, options)
    entries = []
    for config in configs:  # cut and check each exit's graph beside the weights file
        started = time.perf_counter()
        cut = folder / exit_model_file(config.exit_layer)
        _cut_exit(shared, config, cut, weights)
        _check_file(cut)
        parity = _check_scores(cut, batches, reference, {SCORES: config.exit_layer}, config.name, options)
        parity["hidden_states"] = hidden_diff
        entries.append(_model_entry(config, cut, parity, calibrations.get(config.exit_layer)))
        log.info("%s: parity %.2e (hidden %.2e), cut + checks %.1f s", config.name, parity["max_abs_diff"],
                 hidden_diff["max_abs_diff"], time.perf_counter() - started)
    # Every exit of the ratio in one pass, for evaluation: the shared graph without its debug output and
    # last-token branches. Each scores_<k> reads the full layer k, whose input exit k's graph (parity checked
    # above) shares; the all-exits parity check below compares it with PyTorch itself.
    cut = folder / ALL_EXITS_FILE
    _cut_outputs(shared, [f"{SCORES}_{k}" for k in exits], cut, weights)
    _check_file(cut)
    parity = {**_check_scores(cut, batches, reference, {f"{SCORES}_{k}": k for k in exits}, f"all-exits-ratio-{ratio}",
                              options), "hidden_states": hidden_diff, "note": "max over the exits"}
    entries.append({**_model_entry(max(configs, key=lambda c: c.exit_layer), cut, parity, None), "kind": "all_exits",
                    "name": f"all-exits-ratio-{ratio}", "exit_layers": exits,
                    "outputs": [{"name": f"{SCORES}_{k}", "dtype": "float32", "shape": ["batch"]} for k in exits]})
    shared.unlink()  # the debug graph (its tensors are the ones in weights.bin)
    (folder / (DEBUG_GRAPH + ".data")).unlink(missing_ok=True)
    _copy_tokenizer(out, folder)
    manifest = _manifest(folder, ratio, configs[0].compress_layers, entries, adapters, options, source, model,
                         tokenizer)
    if variant:
        manifest["variant"] = variant
    (folder / MODEL_CARD).write_text(ratio_card(manifest, options.data_dir), encoding="utf-8")
    manifest["files"] = folder_files(folder)  # the card is one of the folder's files
    write_json(folder / MANIFEST, manifest)
    return [ExportedConfig(c.name, c.exit_layer, c.ratio, c.compress_layers, folder, exit_model_file(c.exit_layer),
                           variant=c.variant) for c in configs]


def _model_entry(config: ExportConfig, path: Path, parity: dict, calibration: dict | None) -> dict:
    """One graph of a ratio folder, as its manifest lists it."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    int64 = lambda name, shape: {"name": name, "dtype": "int64", "shape": shape}  # noqa: E731
    return {"name": config.name, "kind": "exit", "exit_layer": config.exit_layer, "model_file": path.name,
            "applied_layers": list(config.applied_layers),
            "inputs": [int64(i.name, ["batch", "sequence"] if i.name in TOKEN_INPUTS else ["batch"])
                       for i in proto.graph.input],
            "outputs": [{"name": SCORES, "dtype": "float32", "shape": ["batch"]}],
            "parity": parity, **({"calibration": calibration} if calibration else {})}


def _copy_tokenizer(out: Path, folder: Path) -> None:
    """The tokenizer files saved once per export (``out/.tokenizer``) into one model folder."""
    for item in (out / ".tokenizer").iterdir():
        shutil.copyfile(item, folder / item.name)


def _quantized_copy(source: ExportedConfig, target: Path, scheme: str, options: ExportOptions, tokenizer) -> None:
    """``target``: one float exit model quantized (its own weights file), tokenizer, card, manifest."""
    from .quantize import quantize_model

    target.mkdir()
    info = quantize_model(source.model_path, target / MODEL_FILE, scheme, options.quantize_keep_fp32,
                          calibration=quantization_batches(options.input_format.encoder(tokenizer), options.quantize_pairs),
                          smoothing=options.quantize_smoothing)
    folder_manifest = json.loads((source.path / MANIFEST).read_text())
    model = next(m for m in folder_manifest["models"] if m["model_file"] == source.model_file)
    _copy_tokenizer(source.path.parent, target)
    float_session = _session(source.model_path, options)
    quant_session = _session(target / MODEL_FILE, options)
    batch = validation_batches(options.input_format.encoder(tokenizer))[0]
    names = [i.name for i in float_session.get_inputs()]
    reference = _run(float_session, SCORES, batch, names, source.name)
    scores = _run(quant_session, SCORES, batch, names, target.name)
    if not np.isfinite(scores).all():
        raise ExportError(f"{target.name}: the quantized model gives non-finite scores")
    model = {**model, "name": target.name, "model_file": MODEL_FILE,
             "parity": {"max_abs_diff_vs_float": float(np.abs(scores - reference).max()), "reference": source.name,
                        "note": "quantized: judged by ranking agreement in evaluation, not by a tolerance"}}
    if options.calibration is not None:  # its own Platt fit: quantization moves the scores the float fit was made on
        [own] = _calibration_scores(quant_session, [SCORES], options.input_format.encoder(tokenizer),
                                    options.calibration, names)
        model["calibration"] = _platt(own, options.calibration)
    manifest = {**folder_manifest, "name": target.name, "variant": scheme, "weights_file": MODEL_FILE + ".data",
                "shared_weights": False, "quantization": {**info, "of": source.name}, "models": [model], "files": {}}
    (target / MODEL_CARD).write_text(ratio_card(manifest, options.data_dir), encoding="utf-8")
    manifest["files"] = folder_files(target)
    write_json(target / MANIFEST, manifest)


def quantization_batches(encoder, pairs: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """ONNX feeds (16 pairs each) for the quantizer's activation statistics: ``pairs`` (the pipeline's are
    training pairs, ``quantization_pairs``), else the fixed validation pairs. Also what the quantization
    benchmarks measure with, so they see the export's own statistics."""
    pairs = list(pairs) or list(VALIDATION_PAIRS)
    encoded = encoder.encode_many(pairs)
    return [encoder.collate_numpy(encoded[start:start + 16]) for start in range(0, len(encoded), 16)]


def _calibrate(shared: Path, exits: list[int], encoder, inputs: list[str], options: ExportOptions) -> dict[int, dict]:
    """{exit: Platt (a, b) + provenance} from the ratio's all-exits graph on the calibration pairs."""
    calibration = options.calibration
    if calibration is None:
        return {}
    scores = _calibration_scores(_session(shared, options), [f"{SCORES}_{k}" for k in exits], encoder, calibration,
                                 inputs)
    return {k: _platt(s, calibration) for k, s in zip(exits, scores)}


def _calibration_scores(session, outputs: list[str], encoder, calibration: CalibrationSet,
                        inputs: list[str]) -> list[np.ndarray]:
    """Each output's scores of the calibration pairs (in their order), batched 16 by length."""
    encoded = encoder.encode_many(calibration.pairs)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    scores = [np.empty(len(encoded), dtype=np.float64) for _ in outputs]
    for start in range(0, len(order), 16):
        rows = order[start:start + 16]
        batch = encoder.collate_numpy([encoded[i] for i in rows])
        for column, values in zip(scores, session.run(outputs, {n: batch[n] for n in inputs})):
            column[rows] = values
    return scores


def _platt(scores: np.ndarray, calibration: CalibrationSet) -> dict:
    return {**fit_platt(scores, calibration.labels), "queries": list(calibration.query_ids),
            "split": "calibration half of the eval queries (pipeline/calibration.py)"}


def validation_batches(encoder: PairEncoder) -> list[dict[str, torch.Tensor]]:
    """The fixed parity batch: all pairs together (ragged, batch 5), then each pair alone (batch 1)."""
    encoded = encoder.encode_many(VALIDATION_PAIRS)
    return [encoder.collate(encoded)] + [encoder.collate([e]) for e in encoded]


def _reference(model, batch, exits, compress, ratio) -> dict:
    state = model.embed(batch["input_ids"], batch["attention_mask"], batch["query_lengths"], batch["prompt_lengths"])
    state, scores = model.advance(state, max(exits), set(exits), compress, ratio)
    hidden = model.decoder.norm(state.hidden).float() * state.attention_mask[..., None]
    return {"scores": {k: v.float().numpy() for k, v in scores.items()}, "hidden": hidden.numpy()}


def _torch_export(wrapper, batch, inputs: list[str], outputs: list[str], stage: Path, options: ExportOptions):
    """torch.onnx.export -> onnx_ir model (dynamo by default; TorchScript only when asked)."""
    import onnx_ir as ir

    args = tuple(batch[name] for name in inputs)
    try:
        if options.dynamo:
            batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {name: ({0: batch_dim, 1: seq_dim} if name in TOKEN_INPUTS else {0: batch_dim}) for name in inputs}
            program = torch.onnx.export(wrapper, args, input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                                        opset_version=options.opset, dynamo=True, optimize=False, verbose=False)
            return program.model
        # Documented fallback: the TorchScript exporter (deprecated upstream, warns on mask code).
        axes = {name: ({0: "batch", 1: "sequence"} if name in TOKEN_INPUTS else {0: "batch"}) for name in inputs}
        axes.update({name: {0: "batch"} for name in outputs[:-1]} | {outputs[-1]: {0: "batch", 1: "sequence"}})
        raw = stage / "torchscript.onnx"
        torch.onnx.export(wrapper, args, str(raw), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=options.opset, dynamo=False, external_data=True)
        return ir.load(raw)
    except Exception as err:  # the exporters raise many types; keep the cause
        raise ExportError(f"torch.onnx.export ({'dynamo' if options.dynamo else 'torchscript'}) failed: {err}") from err


def _optimize(graph) -> None:
    """Constant folding + dead-code removal: ~1 s on SmolLM2 and as fast in ONNX Runtime as the
    exporter's full optimizer (``optimize=True``), whose rewrite rules take ~30 s per export on
    two cores. Node metadata (stack traces with local paths) is dropped: smaller, reproducible."""
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    with _quiet("onnxscript", "onnx_ir"):  # they log every skipped fold at INFO
        # first: exit k's last-token branch and the full layer k transpose the same weights; merged here, they
        # fold into one stored copy (folded apart, each copy is a new initializer: 1.5x the weights file)
        passes.CommonSubexpressionEliminationPass()(graph)
        onnxscript.optimizer.fold_constants(graph)
        passes.RemoveUnusedNodesPass()(graph)
        passes.DeduplicateInitializersPass()(graph)
        passes.ClearMetadataAndDocStringPass()(graph)


@contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _cut_outputs(shared: Path, outputs: list[str], target: Path, weights: str | None) -> None:
    """The part of the shared graph that ``outputs`` depend on (drops the debug hidden-state output)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes

    graph = ir.load(shared)
    keep = [v for v in graph.graph.outputs if v.name in outputs]
    graph.graph.outputs.clear()
    graph.graph.outputs.extend(keep)
    passes.RemoveUnusedNodesPass()(graph)
    if weights:
        ir.save(graph, target)
    else:
        ir.save(graph, target, external_data=target.name + ".data", size_threshold_bytes=1024,
                alignment=WEIGHTS_ALIGNMENT)


def _cut_exit(shared: Path, config: ExportConfig, target: Path, weights: str | None) -> None:
    """Exit k's model: the part of the shared graph that ``last_scores_k`` (layer k for the last tokens only)
    depends on."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes

    graph = ir.load(shared)
    scores = next(v for v in graph.graph.outputs if v.name == f"{LAST_SCORES}_{config.exit_layer}")
    graph.graph.outputs.clear()
    graph.graph.outputs.append(scores)
    passes.RemoveUnusedNodesPass()(graph)
    for value in [v for v in graph.graph.inputs if not v.uses()]:
        graph.graph.inputs.remove(value)
    scores.name = SCORES
    graph.graph.name = config.name
    names = [v.name for v in graph.graph.inputs]
    if names != config.input_names:
        raise ExportError(f"{config.name}: graph inputs {names} != expected {config.input_names}")
    if weights:  # keep the references into the shared file (same folder layout)
        ir.save(graph, target)
    else:
        ir.save(graph, target, external_data=target.name + ".data", size_threshold_bytes=1024,
                alignment=WEIGHTS_ALIGNMENT)


def _drop_value_info(path: Path) -> None:
    """Removes the exporter's intermediate shape annotations from ``path`` (graph only, weights untouched).

    They are optional, and some are stale after constant folding: ``onnx.shape_inference`` then
    fails on the file ("Inferred shape and existing shape differ in dimension 0: (576) vs (1)"), and
    so does every tool that runs it first (``onnxruntime.quantization``). Inference recomputes them.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))


def _check_file(path: Path) -> None:
    import onnx

    _drop_value_info(path)
    try:
        onnx.checker.check_model(str(path))  # path-based: works with external data and > 2 GB
    except Exception as err:
        raise ExportError(f"{path}: ONNX checker failed: {err}") from err


# ------------------------------------------------------------------ parity
def _session(path: Path, options: ExportOptions):
    from ..serving.onnx_runtime import create_session

    providers = None if options.dtype == "float16" else ["CPUExecutionProvider"]
    return create_session(path, providers=providers, threads=torch.get_num_threads())


def _run(session, output: str, batch, names: list[str], what: str) -> np.ndarray:
    feed = {name: batch[name].numpy().astype(np.int64) for name in names}
    try:
        return session.run([output], feed)[0]
    except Exception as err:  # onnxruntime raises its own exception types
        raise ExportError(f"{what}: ONNX Runtime cannot run the exported graph on "
                          f"{session.get_providers()[0]}: {err}") from err


def _check_scores(path: Path, batches, reference: list[dict], outputs: dict[str, int], name: str,
                  options: ExportOptions) -> dict:
    """Max |ONNX Runtime - PyTorch| over the validation batches and ``outputs`` (output name -> exit layer)."""
    session = _session(path, options)
    names = [i.name for i in session.get_inputs()]
    diff = 0.0
    for batch, expected_scores in zip(batches, reference):
        for output, exit_layer in outputs.items():
            scores, expected = _run(session, output, batch, names, name), expected_scores["scores"][exit_layer]
            if scores.shape != expected.shape:
                raise ExportError(f"{name}: ORT scores shape {scores.shape} != PyTorch {expected.shape}")
            diff = max(diff, float(np.abs(scores.astype(np.float64) - expected).max()))
    result = {"max_abs_diff": diff, "tolerance": options.tolerance, "reference": "PyTorch float32",
              "provider": session.get_providers()[0], "batch_sizes": sorted({len(b["input_ids"]) for b in batches}),
              "pairs": len(VALIDATION_PAIRS)}
    if not diff <= options.tolerance:  # also catches NaN
        raise ExportError(f"{name}: ONNX Runtime scores differ from PyTorch by {diff:.3g} "
                          f"(> tolerance {options.tolerance:g})")
    return result


def _check_hidden(shared: Path, batches, reference: list[dict], inputs: list[str], options: ExportOptions) -> dict:
    """Every real token's hidden state at the deepest exit (shared graph) vs PyTorch.

    Compared relative to the largest hidden value (final-norm'd states reach ~10^2 on real models).
    """
    session = _session(shared, options)
    diff = scale = 0.0
    for batch, expected in zip(batches, reference):
        hidden = _run(session, HIDDEN, batch, inputs, "hidden-state check")
        if hidden.shape != expected["hidden"].shape:
            raise ExportError(f"hidden-state check: ORT shape {hidden.shape} != PyTorch {expected['hidden'].shape}")
        diff = max(diff, float(np.abs(hidden.astype(np.float64) - expected["hidden"]).max()))
        scale = max(scale, float(np.abs(expected["hidden"]).max()))
    relative = diff / max(scale, 1.0)
    if not relative <= options.tolerance:
        raise ExportError(f"hidden-state check: ORT differs from PyTorch by {diff:.3g} ({relative:.3g} relative, "
                          f"> tolerance {options.tolerance:g}); the exported attention mask is suspect")
    return {"max_abs_diff": diff, "relative": relative, "max_abs_value": scale,
            "exit_layer": max(reference[0]["scores"]),
            "note": "every real token's final-norm'd hidden state at this exit, shared graph of the ratio"}


# ------------------------------------------------------------------ manifest
def _manifest(folder: Path, ratio: int, compress_layers: Sequence[int], models: list[dict], adapters: list[Path],
              options: ExportOptions, source: str, model, tokenizer) -> dict:
    """What ``folder`` is: what its graphs share (weights, adapters, input format, versions) and each graph."""
    import onnx
    import onnxruntime
    import transformers

    from .. import __version__
    from ..serving.tokenizer import special_token_ids

    proto = onnx.load(str(folder / models[0]["model_file"]), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "format_version": FORMAT_VERSION,
        "name": folder.name,
        "num_layers": model.num_layers,
        "compression": {"layers": list(compress_layers), "ratio": ratio},
        "adapters": [{"path": str(p), "sha256": adapter_sha256(p)} for p in adapters],
        **({"weights_file": WEIGHTS_FILE} if options.share_weights else {}),  # else each graph's <file>.data
        "shared_weights": options.share_weights,
        "opset": opset,
        "dtype": options.dtype,
        "exporter": "dynamo" if options.dynamo else "torchscript",
        "attn_implementation": options.attn_implementation,
        "input_format": options.input_format.to_dict(),
        "tokenizer": special_token_ids(tokenizer),
        "source_model": source,
        "model_type": model.config.model_type,
        "params_fingerprint": options.params_fingerprint,
        "versions": {"matryoshka_reranker": __version__, "torch": torch.__version__.split("+")[0],
                     "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "models": models,
        "files": {},  # listed by the caller once the model card (one of the files) is written
    }
