"""Bytes of an export: each ratio folder against one full model (artifact format 3's sharing).

    python -m benchmarks.bench_artifact_bytes [--onnx models/onnx]

Per ratio folder: bytes on disk (every file, counted once), one full model (the deepest exit's
graph + the tensor bytes it references + the tokenizer files), their ratio (the issue's goal:
<= 1.2x), what the same exits would cost as standalone models (each graph with its own copy of the
tensors it reads: format 2 without hard links, or ``share_weights: false``), and each file's link
count (1 everywhere: standard ONNX tools refuse hard-linked external data).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx

from matryoshka_reranker.serving.artifacts import read_index, read_manifest


def referenced_bytes(graph: Path) -> int:
    """Bytes of the external tensors ``graph`` reads (offset/length entries of its initializers)."""
    proto = onnx.load(str(graph), load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}["length"]) for t in proto.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", default="models/onnx")
    args = parser.parse_args()
    folders = sorted({c.path for c in read_index(args.onnx) if c.variant is None})
    print(f"{'folder':10s} {'on disk MB':>10s} {'full model MB':>13s} {'ratio':>6s} {'standalone MB':>13s} "
          f"{'saved':>6s} {'max links':>9s}")
    for folder in folders:
        manifest = read_manifest(folder, verify=False)
        files = [folder / name for name in manifest["files"]] + [folder / "manifest.json"]
        on_disk = sum(f.stat().st_size for f in files)
        graphs = [m for m in manifest["models"] if m.get("kind", "exit") == "exit"]
        deepest = max(graphs, key=lambda m: m["exit_layer"])
        extras = sum(f.stat().st_size for f in files if f.suffix not in (".onnx", ".bin", ".data"))
        full = (folder / deepest["model_file"]).stat().st_size + referenced_bytes(folder / deepest["model_file"]) + extras
        standalone = sum((folder / m["model_file"]).stat().st_size + referenced_bytes(folder / m["model_file"]) + extras
                         for m in graphs)
        links = max(os.stat(f).st_nlink for f in files)
        print(f"{folder.name:10s} {on_disk / 1e6:10.1f} {full / 1e6:13.1f} {on_disk / full:5.2f}x {standalone / 1e6:13.1f} "
              f"{standalone / on_disk:5.2f}x {links:9d}")


if __name__ == "__main__":
    main()
