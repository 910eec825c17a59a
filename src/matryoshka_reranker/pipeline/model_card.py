"""Model cards (Hugging Face format, ``huggingface_hub.ModelCard``) for exported exit models and releases.

Each exported folder (a ratio's exits, or a quantized copy) carries a ``README.md`` card written at
export (so it is in the manifest's file list): base model, exits, ratio, compression layers, adapters, parity, calibration,
licenses of the base model and of the training data, and how to use it. Quality is measured after
export (the evaluate stage), so the folder card points to the release card, which ``publish``
writes as ``releases/<version>.md`` with the per-layer metrics and their intervals.
"""

from __future__ import annotations

from typing import Any

DATA_LICENSES = {  # the embedded default data; a user's own data: say so in params (data.license)
    "data/scifact": ("cc-by-nc-2.0", "BEIR SciFact (CC BY-NC 2.0: non-commercial use only)"),
}
MODEL_LICENSES = {"embedded:smollm2-135m-instruct": ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def _usage(folder: str, exit_layer: int, ratio: int, variant: str | None = None) -> str:
    release = f", variant=\"{variant}\"" if variant else ""
    return f"""```python
from matryoshka_reranker import OnnxReranker

reranker = OnnxReranker("{folder}", exit_layer={exit_layer})   # or OnnxReranker.from_release("latest", exit_layer={exit_layer}, ratio={ratio}{release})
reranker.compute_score([("what causes colds?", "Rhinoviruses cause most colds.")], normalize=True)
reranker.rank("what causes colds?", ["Rhinoviruses cause most colds.", "Paris is in France."], top_k=1)
```

Served over HTTP (TEI-compatible `/rerank`, depth and width per request):

```bash
matryoshka serve --models models/onnx --port 8080{f" --variant {variant}" if variant else ""}
curl -s localhost:8080/rerank -H 'content-type: application/json' \\
  -d '{{"query": "what causes colds?", "texts": ["Rhinoviruses cause most colds."], "exit_layer": {exit_layer}, "ratio": {ratio}}}'
```"""


def ratio_card(manifest: dict[str, Any], data_dir: str | None = None) -> str:
    """The README.md of one exported folder, from its manifest (written before the manifest's file list)."""
    from huggingface_hub import ModelCard, ModelCardData

    source = manifest.get("source_model", "")
    model_license, base = MODEL_LICENSES.get(source, ("other", source))
    data_license, data_text = DATA_LICENSES.get(data_dir or "", (None, data_dir or "the user's training data"))
    comp = manifest["compression"]
    exits = sorted((m for m in manifest["models"] if m.get("kind", "exit") == "exit"), key=lambda m: m["exit_layer"])
    depths = [m["exit_layer"] for m in exits]
    variant = manifest.get("variant")
    metadata = ModelCardData(
        license=model_license, base_model=base if base else None, library_name="onnx", pipeline_tag="text-ranking",
        tags=["reranker", "cross-encoder", "matryoshka", *[f"exit-{k}" for k in depths], f"ratio-{comp['ratio']}",
              *([variant] if variant else [])],
        datasets=["BeIR/scifact"] if data_dir == "data/scifact" else None,
    )
    what = f"exit layer {depths[0]}" if len(depths) == 1 else f"exit layers {', '.join(map(str, depths))}"
    lines = [
        f"# {manifest['name']}: Matryoshka re-ranker, {what} of {manifest['num_layers']}, ratio {comp['ratio']}"
        + (f", {variant}" if variant else ""),
        "",
        f"A cross-encoder on `{base}`, one ONNX graph per exit depth (decoder layers 1..k and score head k)"
        + (f", with passage tokens merged in groups of {comp['ratio']} at layers {comp['layers']} (an exit at or "
           "before a compression layer runs uncompressed). " if comp["ratio"] > 1 else ", passages uncompressed. ")
        + ("The graphs share one weights file (`weights.bin`), so the folder costs about one copy of its layers. "
           if manifest.get("shared_weights") else "")
        + f"ONNX ({manifest['dtype']}, opset {manifest['opset']}), exported by matryoshka-reranker; every graph "
        "opens with the standard ONNX tools (`onnx.load`, `onnx.checker`, `onnxruntime.quantization`).",
        "",
        "## Licenses",
        "",
        f"- Base model: {base} ({model_license}).",
        f"- Training and evaluation data: {data_text}." + (
            " Models trained on it inherit its non-commercial terms." if data_license == "cc-by-nc-2.0" else ""),
        "- Code: Apache-2.0.",
        "",
        "## What is inside",
        "",
        "| exit layer | graph | compressed at | max abs diff vs PyTorch | calibration (Platt a, b) |",
        "|---|---|---|---|---|",
    ]
    for m in exits:
        parity = m.get("parity", {})
        diff = parity.get("max_abs_diff", parity.get("max_abs_diff_vs_float", float("nan")))
        cal = m.get("calibration")
        lines.append(f"| {m['exit_layer']} | `{m['model_file']}` | {m.get('applied_layers') or 'none'} | {diff:.2e} | "
                     + (f"{cal['a']:.4f}, {cal['b']:.4f} ({cal['pairs']} pairs)" if cal and cal.get("method") != "none"
                        else f"none ({cal['note']})" if cal and cal.get("note") else "none") + " |")
    lines += [
        "",
        f"- Adapters merged, in order: {', '.join(a['path'] for a in manifest['adapters']) or 'none'}.",
        f"- Input format: `{manifest['input_format']['template']}`, query <= {manifest['input_format']['query_max_len']}"
        f" tokens, passage <= {manifest['input_format']['passage_max_len']} tokens, prompt "
        f"\"{manifest['input_format']['prompt']}\".",
        "- Calibration: fitted on held-apart eval queries; `normalize=True` and the server's `raw_scores: false` "
        "return it (a plain sigmoid where there is none).",
    ]
    if variant == "specialist":
        lines.append(f"- Exit specialist: decoder layers 1..{depths[-1]} of the ratio-1 model, trained further for exit "
                     f"{depths[-1]} alone on that model's deepest exit's scores; its weights are its own, so it ships "
                     f"apart from the shared-weight `exit-{depths[-1]:02d}-ratio-1`.")
    if manifest.get("quantization"):
        lines.append(f"- Quantized ({variant}) from `{manifest['quantization'].get('of')}`: judged by its ranking "
                     "agreement with the float model in evaluation.")
    lines += ["", "## Quality", "",
              "Measured after export by the evaluate stage: see the release card `releases/<version>.md` "
              "(per-layer nDCG@10 / RR@10 / R@10 with 95% intervals) or `metrics/per_layer.json`.",
              "", "## Use", "", _usage(manifest["name"], depths[-1], comp["ratio"],
                                       variant if variant == "specialist" else None), ""]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def release_card(version: str, record: dict[str, Any]) -> str:
    """``releases/<version>.md``: what was released, its gate verdict and per-layer quality with intervals."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..serving.artifacts import parse_config_name

    metrics = record.get("metrics", {})
    configs = metrics.get("configs", {})
    measures = record.get("policy", {}).get("measures") or ["nDCG@10"]
    ev = metrics.get("eval", {})
    metadata = ModelCardData(library_name="onnx", pipeline_tag="text-ranking",
                             tags=["reranker", "matryoshka", version])
    gate = record.get("gate", {})
    lines = [f"# Release {version}", "",
             f"Gate: {'WAIVED' if gate.get('waived') else 'passed' if gate.get('passed') else 'failed'} "
             f"(baseline {gate.get('baseline') or 'none: first release'}).", "",
             f"Quality on {ev.get('queries', '?')} eval queries x {ev.get('candidates', '?')} BM25 candidates "
             f"(mean [{ev.get('confidence', 0.95):.0%} bootstrap interval over queries]):", "",
             "| config | " + " | ".join(measures) + " | ms/query |", "|---" * (len(measures) + 2) + "|"]
    for name, entry in configs.items():
        cells = [f"{entry[m]:.3f} [{entry[m + '_ci'][0]:.3f}, {entry[m + '_ci'][1]:.3f}]" if f"{m}_ci" in entry
                 else f"{entry.get(m, float('nan')):.3f}" for m in measures]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry.get('latency_ms_per_query', float('nan')):.0f} |")
    bm25 = metrics.get("baselines", {}).get("bm25", {})
    if bm25:
        lines.append("| BM25 (first stage) | " + " | ".join(f"{bm25.get(m, float('nan')):.3f}" for m in measures) + " | |")
    # the usage example opens a released exit: the deepest shared-weight one of the smallest ratio
    shared = sorted((r, -k) for k, r, variant in map(parse_config_name, record.get("files") or configs)
                    if variant is None)
    ratio, deepest = (shared[0][0], -shared[0][1]) if shared else (1, 30)
    lines += ["", "Files and their sha256: `releases/" + version + ".json` (what `matryoshka download` checks).",
              "", "## Use", "", _usage(f"downloads/{version}/ratio-{ratio}", deepest, ratio), ""]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))
