"""Scoring with an exported model on ONNX Runtime: same input format and API as ``MatryoshkaReranker``.

>>> from matryoshka_reranker import OnnxReranker
>>> reranker = OnnxReranker("models/onnx/ratio-2", exit_layer=16)
>>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")])
>>> reranker.rank("what is panda?", ["The giant panda is a bear.", "Paris is in France."])

A folder is trusted only if it matches its ``manifest.json`` (``artifacts.read_manifest``). This
module needs onnxruntime, tokenizers and numpy only: it never imports torch or transformers, so a
serving box can skip them.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..model.inputs import as_pair_list
from .artifacts import (
    SCORES,
    ModelIntegrityError,
    calibrated_probability,
    config_name,
    manifest_input_format,
    model_view,
    read_manifest,
)
from .ranking import rank_documents
from .tokenizer import ServingTokenizer

log = logging.getLogger(__name__)

Pair = tuple[str, str]


def cuda_works() -> bool:
    """True when a CUDA device is really usable (the CUDA provider is listed even without a GPU)."""
    import ctypes.util

    # Without importing torch: the CUDA provider is usable when a driver is installed and a device shows.
    if ctypes.util.find_library("cuda") is None:
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


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
                   optimization: str = "all", initializers: dict | None = None):
    """An ``InferenceSession`` with our defaults: full graph optimisation, quiet logs, ``threads`` intra-op.

    ``initializers`` ({name: OrtValue}) replace the graph's external weights with values the caller
    holds, so several sessions of one ratio share one memory-mapped copy (``server.mapped_initializers``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for name, value in (initializers or {}).items():
        if not name.startswith("__"):
            options.add_initializer(name, value)
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


def _used_by(initializers: dict | None, model_file: Path) -> dict | None:
    """The subset of shared initializers this model's graph has (a shallow exit uses fewer layers)."""
    if not initializers:
        return None
    import onnx

    names = {t.name for t in onnx.load(str(model_file), load_external_data=False).graph.initializer}
    return {k: v for k, v in initializers.items() if k in names}


class OnnxReranker:
    """Scores (query, passage) pairs with one exported configuration (exit layer, ratio).

    ``folder`` is a ratio's folder of an export (``models/onnx/ratio-1``, or a download of one) and
    ``exit_layer`` the depth to run (``None``: the deepest in the folder); a quantized copy's folder
    holds one model. ``all_exits=True`` loads the ratio's every-exit graph instead: ``score_exits``
    then gives every exit's scores from one pass (what evaluation uses), ``compute_score`` ``exit_layer``'s
    (``None``: the deepest's).

    ``providers`` overrides the automatic choice (CUDA when a GPU works, else CPU); ``threads``
    sets ONNX Runtime's intra-op threads (default: its own choice). ``verify=False`` skips the
    sha256 check of every file (the manifest's format version is still checked).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        exit_layer: int | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        batch_size: int = 32,
        verify: bool = True,
        initializers: dict | None = None,
        all_exits: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, numbers.Integral)):
            raise TypeError(f"exit_layer must be an int or None, got {exit_layer!r}")
        exit_layer = None if exit_layer is None else int(exit_layer)  # e.g. a numpy integer from a metrics array
        self.folder = Path(folder)
        manifest = read_manifest(self.folder, verify=verify)
        self.manifest = model_view(manifest, exit_layer, all_exits=all_exits)
        if all_exits:  # compute_score gives exit_layer's scores (None: the deepest), calibrated as that exit's model
            exit_model = model_view(manifest, self.manifest["exit_layer"] if exit_layer is None else exit_layer)
            self.manifest = {**self.manifest, "exit_layer": exit_model["exit_layer"],
                             **({"calibration": exit_model["calibration"]} if "calibration" in exit_model else {})}
        self.input_format = manifest_input_format(self.manifest)
        self.encoder = self.input_format.encoder(ServingTokenizer.from_manifest(self.folder, self.manifest))
        self.session = create_session(self.folder / self.manifest["model_file"], providers, threads,
                                      initializers=_used_by(initializers, self.folder / self.manifest["model_file"]))
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = [i["name"] for i in self.manifest["inputs"]]
        if self.input_names != expected:
            raise ModelIntegrityError(f"{self.folder}: model inputs {self.input_names} != manifest {expected}")
        self.batch_size = batch_size
        if self.manifest["dtype"] == "float16" and self.providers[0] == "CPUExecutionProvider":
            log.warning("%s is a float16 export running on CPU: expect it to be slow", self.folder)

    @classmethod
    def from_release(cls, version: str = "latest", exit_layer: int | None = None, ratio: int = 1, repo: str = ".",
                     variant: str | None = None, **kwargs) -> OnnxReranker:
        """One exit model of a published release: resolved through DVC at the version's tag, downloaded
        once into a per-version cache folder, sha256-verified against the release record in git, and
        reused from the cache while it still verifies. ``exit_layer=None``: the deepest exported exit;
        ``variant="specialist"``: the release's exit specialist at ``exit_layer`` (ratio 1).

        This needs the release tooling (git, DVC); serving a folder you already have needs neither.
        """
        from ..release.registry import (
            fetch_release,  # the one call that reaches up into the release layer
        )

        if variant is not None and exit_layer is None:
            raise ValueError(f"variant {variant!r}: name its exit_layer")
        layers = None if exit_layer is None else [exit_layer]
        _, folders = fetch_release(version, repo=repo, exit_layers=layers, ratios=[ratio], variant=variant,
                                   shared=variant is None)
        if variant is not None:
            wanted = config_name(exit_layer, ratio, variant)
            folders = [f for f in folders if f.name == wanted]
            if not folders:
                raise ValueError(f"release {version} has no {wanted}")
        return cls(folders[0], exit_layer, **kwargs)  # the ratio's folder; None: its deepest exit

    @property
    def exit_layer(self) -> int:
        return self.manifest["exit_layer"]

    @property
    def exit_layers(self) -> list[int]:
        """The exits this model outputs: all of the ratio's for the all-exits graph, else its own."""
        return list(self.manifest.get("exit_layers") or [self.exit_layer])

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

        ``normalize=True`` gives this exit's calibrated probability (Platt scaling fitted at export
        on a calibration half of the eval queries; a plain sigmoid for a folder without one). Pairs
        are batched longest first (less padding) and the scores returned in the order given.
        """
        pairs, single = as_pair_list(pairs)
        scores = self._run(pairs, batch_size)[self.exit_layer]
        if normalize:  # this exit's calibrated probability (Platt, fitted at export), else a sigmoid
            scores = calibrated_probability(self.manifest.get("calibration"), scores)
        result = [float(s) for s in scores]
        return result[0] if single else result

    def score_exits(self, pairs: Sequence[Pair], batch_size: int | None = None) -> dict[int, list[float]]:
        """{exit layer: scores} for every exit this folder outputs, from one pass over ``pairs``."""
        pairs, _ = as_pair_list(pairs)
        return {k: [float(s) for s in v] for k, v in self._run(pairs, batch_size).items()}

    def _run(self, pairs: list, batch_size: int | None) -> dict[int, np.ndarray]:
        """Pairs batched longest first (less padding); scores returned in the order given."""
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        outputs = {k: (f"{SCORES}_{k}" if "exit_layers" in self.manifest else SCORES) for k in self.exit_layers}
        encoded = self.encoder.encode_many(pairs)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        scores = {k: np.empty(len(encoded), dtype=np.float32) for k in outputs}
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch = self.encoder.collate_numpy([encoded[i] for i in rows])
            feed = {name: batch[name] for name in self.input_names}
            for k, values in zip(outputs, self.session.run(list(outputs.values()), feed)):
                scores[k][rows] = values
        return scores

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, normalize: bool = False,
             first_stage_scores: Sequence[float] | None = None, first_stage_weight: float = 0.5) -> list[dict]:
        """Documents ranked for one query, best first, as sentence-transformers' ``CrossEncoder.rank``:
        ``[{"corpus_id": index in documents, "score": float(, "text": document)}]``. With
        ``first_stage_scores`` (e.g. BM25's) ranks by their fusion with ours (``ranking.fuse_scores``)."""
        calibration = self.manifest.get("calibration")
        return rank_documents(lambda pairs: self.compute_score(pairs, batch_size=batch_size),
                              query, documents, top_k, return_documents, first_stage_scores, first_stage_weight,
                              (lambda raw: calibrated_probability(calibration, raw)) if normalize else None)
