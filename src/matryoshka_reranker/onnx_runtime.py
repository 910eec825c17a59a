"""Scoring with an exported model on ONNX Runtime: same input format and API as ``MatryoshkaReranker``.

>>> from matryoshka_reranker import OnnxReranker
>>> reranker = OnnxReranker("models/onnx/exit-16_ratio-2")
>>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")])

A folder is trusted only if its ``manifest.json`` is from a known format version and every file
it lists has the recorded sha256 (a truncated or edited ``.onnx`` or weights file is refused
before ONNX Runtime reads it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import sha256_file
from .export import FORMAT_VERSION, MANIFEST, SCORES, TokenizationSettings
from .inputs import as_pair_list

log = logging.getLogger(__name__)

Pair = tuple[str, str]
_VERIFIED: dict[tuple, str] = {}  # (device, inode, size, mtime) -> sha256: hard-linked weights hash once


class ModelIntegrityError(ValueError):
    """A model folder does not match its manifest (missing, newer format, or changed files)."""


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """The folder's manifest, after checking its format version and (``verify``) every file's sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelIntegrityError(f"{folder} has no {MANIFEST}: not an exported Matryoshka model folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelIntegrityError(f"{path} is not valid JSON: {err}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelIntegrityError(f"{path}: missing or invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelIntegrityError(f"{path} has format_version {version}; this matryoshka-reranker reads up to "
                                  f"{FORMAT_VERSION}: upgrade the package")
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("model_file") not in files:
        raise ModelIntegrityError(f"{path}: 'files' must list every file, including the model file")
    if verify:
        for name, expected in files.items():
            _verify_file(folder, name, expected)
    return manifest


def _verify_file(folder: Path, name: str, expected: str) -> None:
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelIntegrityError(f"manifest lists {name!r}, which is outside {folder}")
    if not path.is_file():
        raise ModelIntegrityError(f"{path} is listed in the manifest but missing")
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    actual = _VERIFIED.get(key) or sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(f"{path}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...): "
                                  f"the file is corrupted, truncated or was changed after export")
    _VERIFIED[key] = actual


def cuda_works() -> bool:
    """True when a CUDA device is really usable (the CUDA provider is listed even without a GPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def pick_providers(providers: Sequence[str] | None = None) -> list[str]:
    """``providers`` as given (checked), else CUDA (+ CPU fallback) when a GPU works, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(f"execution provider(s) {unknown} not available; available: {available}")
        return list(providers)
    if "CUDAExecutionProvider" in available and cuda_works():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
                   optimization: str = "all"):
    """An ``InferenceSession`` with our defaults: full graph optimisation, quiet logs, ``threads`` intra-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    chosen = pick_providers(providers)
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelIntegrityError(f"{path}: ONNX Runtime cannot load the model: {err}") from err
    if chosen[0] != "CPUExecutionProvider" and session.get_providers()[0] != chosen[0]:
        log.warning("%s requested but ONNX Runtime fell back to %s", chosen[0], session.get_providers()[0])
    return session


class OnnxReranker:
    """Scores (query, passage) pairs with one exported configuration (exit layer, ratio).

    ``providers`` overrides the automatic choice (CUDA when a GPU works, else CPU); ``threads``
    sets ONNX Runtime's intra-op threads (default: its own choice). ``verify=False`` skips the
    sha256 check of every file (the manifest's format version is still checked).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        batch_size: int = 32,
        verify: bool = True,
    ):
        from transformers import AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        settings = self.manifest["tokenization"]
        self.encoder = TokenizationSettings(
            settings["prompt"], settings["max_length"], settings.get("query_max_len"), settings.get("passage_max_len")
        ).encoder(AutoTokenizer.from_pretrained(self.folder))
        self.session = create_session(self.folder / self.manifest["model_file"], providers, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = [i["name"] for i in self.manifest["inputs"]]
        if self.input_names != expected:
            raise ModelIntegrityError(f"{self.folder}: model inputs {self.input_names} != manifest {expected}")
        self.batch_size = batch_size
        if self.manifest["dtype"] == "float16" and self.providers[0] == "CPUExecutionProvider":
            log.warning("%s is a float16 export running on CPU: expect it to be slow", self.folder)

    @property
    def exit_layer(self) -> int:
        return self.manifest["exit_layer"]

    @property
    def compress_ratio(self) -> int:
        return self.manifest["compression"]["ratio"]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def compute_score(
        self,
        pairs: Pair | Sequence[Pair],
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> float | list[float]:
        """Relevance scores, higher = more relevant; a single ``(query, passage)`` tuple gives a float.

        ``normalize=True`` applies a sigmoid. Pairs are batched longest first (less padding) and
        the scores returned in the order given.
        """
        pairs, single = as_pair_list(pairs)
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        encoded = [self.encoder.encode(q, p) for q, p in pairs]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        scores = np.empty(len(encoded), dtype=np.float32)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch = self.encoder.collate([encoded[i] for i in rows])
            feed = {name: batch[name].numpy().astype(np.int64) for name in self.input_names}
            scores[rows] = self.session.run([SCORES], feed)[0]
        if normalize:
            scores = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
        result = [float(s) for s in scores]
        return result[0] if single else result
