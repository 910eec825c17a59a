"""``matryoshka serve``: a TEI-compatible HTTP re-ranking server with depth x width chosen per request.

Endpoints (text-embeddings-inference's rerank API, plus the Matryoshka extension):

* ``POST /rerank`` ``{"query", "texts", "raw_scores": false, "return_text": false, "truncate": null,
  "exit_layer": null, "ratio": null}`` -> ``[{"index", "score"(, "text")}]`` best first.
  ``exit_layer``/``ratio`` pick the exported model (default: the deepest exit at ratio 1, or, where
  ratio 1 is not served, the deepest exit at its own smallest ratio; ``Pool.resolve``; an unknown pair
  is a 422 listing what is exported). ``raw_scores: false`` returns probabilities:
  the model's calibrated (Platt) probability when its manifest carries a calibration, else a sigmoid.
  ``first_stage_scores`` (one number per text, e.g. BM25's) and ``first_stage_weight`` (0.5) rank
  by their fusion with the re-ranker, as ``rank(first_stage_scores=...)`` does (``serving.ranking``):
  ``score`` is then the fused value and each item adds ``reranker_score``. Not in TEI: a first
  stage's scores are what makes a small re-ranker beat the first stage (README, "Quality").
  ``POST /`` and ``POST /invocations`` answer as ``/rerank``, as TEI routes them for a reranker.
* ``GET /health`` (also ``GET /`` and ``GET /ping``, as TEI): 200, or TEI's 503 ``Unhealthy`` while the
  default config's latest load failed (the check itself retries that load, at most every 10 s);
  ``GET /info`` (model, version, exits x ratios, calibration, limits),
  ``GET /metrics`` (Prometheus text: requests and latency histogram per config, queue depth).

Two backends behind the same API. ``ModelPool`` (``--models`` / ``--version``): the exported ONNX graphs,
what a release carries. ``TorchPool`` (``--pipeline``): the pipeline's trained PyTorch model, one
``MatryoshkaReranker`` per ratio serving every exit of it; on CPUs with AMX-BF16 it scores in bf16,
2.0-2.7x ONNX Runtime fp32 there (whose CPU provider has no bf16: README, "bf16 on AMX CPUs"), and on
a GPU in bf16 too; its probabilities use the export's Platt calibration when the export is there.

How the ONNX backend serves: one ONNX Runtime session per (exit, ratio), loaded on first use; the exits of a
ratio share one weights file (their folder's ``weights.bin``), so their sessions are given the same
memory-mapped initializers (ONNX Runtime's ``add_initializer``) and the weights are in memory once
per ratio. Requests for a
config are micro-batched (``batch_window_ms``), run off the event loop in a worker thread, and
queued up to ``max_queue`` requests per config; beyond that the server answers 429. ``truncate`` left out or
null is ``auto_truncate`` (TEI's ``--auto-truncate``, true by default); a body over ``payload_limit`` is a 413;
fields TEI does not read are ignored, as TEI does. Bad input
(empty texts: 400 ``Empty`` as TEI; too many texts or a text over the model's budget with ``truncate:
false``: 422 ``Validation`` as TEI; wrong JSON types, a body that is not UTF-8 JSON) is a 4xx naming the field, never a 500; a
model that cannot load or returns non-finite scores is TEI's backend error, 424. Uvicorn stops
accepting on SIGTERM and lets in-flight requests finish before the workers stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.requests import Request  # here, not in create_app: FastAPI resolves the handler's annotations

from .. import __version__
from ..core.jsonl import is_valid_unicode
from .artifacts import (
    ALL_EXITS_FILE,
    INDEX,
    ExportedConfig,
    adapter_sha256,
    calibrated_probability,
    config_manifest,
    config_name,
    read_index,
    read_index_extra,
    read_manifest,
)
from .ranking import fuse_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    max_texts: int = 1000  # texts per request
    max_queue: int = 64  # queued requests per config before 429
    batch_window_ms: float = 2.0  # how long a batch waits for more requests
    max_batch_pairs: int = 256  # pairs per model call
    threads: int | None = None  # intra-op threads (ONNX Runtime per session, PyTorch per process; None: default)
    workers: int = 1  # threads running model calls (ORT and PyTorch release the GIL)
    verify: bool = True  # sha256 of every file before loading
    auto_truncate: bool = True  # TEI's --auto-truncate: what `truncate` left out or null means (TEI >= 1.9: true)
    payload_limit: int = 2_000_000  # TEI's --payload-limit: request bodies over this many bytes are a 413
    api_key: str | None = field(default=None, repr=False)  # TEI's --api-key: `Authorization: Bearer <key>`, else 401

    def __post_init__(self):  # asyncio reads a queue size of 0 as unbounded: --max-queue 0 would never answer 429
        for name in ("max_texts", "max_queue", "max_batch_pairs", "workers", "payload_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise ValueError("api_key is empty or has leading/trailing white space (a newline from a file?)")


class ServerInputError(ValueError):
    """A request the server refuses with 4xx; ``field`` names what was wrong."""

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field_name, status


# --------------------------------------------------------------------------------- models
class Pool:
    """What the app asks of a backend: ``configs`` ({(exit, ratio): config}), ``default`` (the key a request
    naming neither gets), ``folder`` / ``index`` / ``version`` (for ``/info`` and the log), ``get(key)``
    (the config's scorer: ``compute_score``, ``encoder``, ``manifest``) and ``describe()``."""

    options: ServerOptions
    version: str | None
    folder: Path
    index: dict
    configs: dict
    default: tuple[int, int]

    @staticmethod
    def default_key(keys: Iterable[tuple[int, int]]) -> tuple[int, int]:
        """The deepest exit at ratio 1; without ratio 1, the deepest exit at its smallest ratio."""
        keys = list(keys)
        at_1 = [k for k, r in keys if r == 1]
        deepest = max(at_1) if at_1 else max(k for k, _ in keys)
        return deepest, (1 if at_1 else min(r for k, r in keys if k == deepest))

    def resolve(self, exit_layer: int | None, ratio: int | None) -> tuple[int, int]:
        """The (exit, ratio) a request gets: neither named, ``default``; only the ratio, the deepest exit
        served at it; only the exit, ratio 1 there, or its smallest served ratio where ratio 1 is not."""
        if exit_layer is None and ratio is None:
            key = self.default
        elif exit_layer is None:
            exits = [k for k, r in self.configs if r == ratio]
            key = (max(exits) if exits else self.default[0], ratio)
        elif ratio is None:
            ratios = sorted(r for k, r in self.configs if k == exit_layer)
            key = (exit_layer, 1 if 1 in ratios or not ratios else ratios[0])
        else:
            key = (exit_layer, ratio)
        if key not in self.configs:
            available = ", ".join(f"(exit_layer={k}, ratio={r})" for k, r in sorted(self.configs))
            raise ServerInputError("exit_layer", f"no exported model for exit_layer={key[0]}, ratio={key[1]}; "
                                                 f"exported: {available}")
        return key

    def get(self, key: tuple[int, int]):
        raise NotImplementedError

    def describe(self) -> list[dict]:
        raise NotImplementedError


class ModelPool(Pool):
    """The exported configs of one export folder, each loaded on first request."""

    def __init__(self, folder: str | os.PathLike | Sequence[str | os.PathLike], options: ServerOptions = ServerOptions(),
                 version: str | None = None, exit_layers: Sequence[int] | None = None, variant: str | None = None):
        """``folder``: an export folder with ``index.json``, or a list of exported model folders
        (e.g. the ratio folders of a downloaded release); ``exit_layers``: serve only these exits
        (a ratio's folder holds all of them), else every exit model found; ``variant``: serve that
        variant (``specialist``) in place of the shared-weight model where the folder has one."""
        self.options, self.version = options, version
        if isinstance(folder, (str, os.PathLike)):
            self.folder = Path(folder)
            configs = read_index(self.folder)
            self.index = read_index_extra(self.folder)
        else:
            folders = list(dict.fromkeys(Path(f) for f in folder))
            self.folder = folders[0].parent
            manifests = [read_manifest(f) for f in folders]
            configs = [ExportedConfig(e["name"], e["exit_layer"], m["compression"]["ratio"],
                                      tuple(m["compression"]["layers"]), f, e["model_file"], m.get("variant"))
                       for f, m in zip(folders, manifests) for e in m["models"] if e.get("kind", "exit") == "exit"]
            self.index = {"input_format": manifests[0].get("input_format"), "source_model": manifests[0].get("source_model")}
        if exit_layers is not None:
            configs = [c for c in configs if c.exit_layer in set(exit_layers)]
        if not any(c.variant is None for c in configs):
            raise ServerInputError("models", f"{folder}: no exported models to serve"
                                   + (f" at exit layers {list(exit_layers)}" if exit_layers is not None else ""))
        self.configs: dict[tuple[int, int], ExportedConfig] = choose_variant(configs, variant, folder)
        self._loaded: dict[tuple[int, int], object] = {}
        self._shared: dict[Path, dict] = {}  # folder -> name -> OrtValue (memory-mapped, shared by its exits)
        self._locks: dict[object, threading.Lock] = {}  # one per config and one per shared weights file
        self._guard = threading.Lock()  # guards _locks only: loads of different configs run side by side
        self.default = self.default_key(self.configs)

    def _lock(self, name: object) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def get(self, key: tuple[int, int]):
        """The key's ``OnnxReranker`` (loaded once; concurrent first requests load it once)."""
        if key in self._loaded:
            return self._loaded[key]
        with self._lock(key):  # a config that is slow to load (or to fail) holds up only its own requests
            if key not in self._loaded:
                from .onnx_runtime import OnnxReranker

                config = self.configs[key]
                started = time.perf_counter()
                shared = self._shared_initializers(config)
                self._loaded[key] = OnnxReranker(config.path, config.exit_layer, threads=self.options.threads,
                                                 verify=self.options.verify, batch_size=self.options.max_batch_pairs,
                                                 initializers=shared)
                log.info("loaded %s in %.1f s%s", config.name, time.perf_counter() - started,
                         " (weights shared with its ratio's other exits)" if shared else "")
            return self._loaded[key]

    def _shared_initializers(self, config: ExportedConfig) -> dict | None:
        """Memory-mapped initializers of the ratio's shared weights file, created once per ratio (from
        the all-exits graph where the folder has one: it references every tensor of the ratio)."""
        manifest = read_manifest(config.path, verify=False)
        if not manifest.get("shared_weights"):
            return None
        with self._lock(config.path):  # per folder: a specialist is ratio 1 with weights of its own
            return self._shared_of(config, manifest)

    def _shared_of(self, config: ExportedConfig, manifest: dict) -> dict | None:
        if config.path not in self._shared:
            widest = ALL_EXITS_FILE if ALL_EXITS_FILE in manifest["files"] else config.model_file
            try:
                self._shared[config.path] = mapped_initializers(config.path / widest)
            except Exception as err:  # noqa: BLE001 - sharing is an optimisation: fall back to plain loading
                log.warning("%s: cannot share weights (%s); loading them per session", config.name, err)
                self._shared[config.path] = {}
        return self._shared[config.path] or None

    def describe(self) -> list[dict]:
        out = []
        for (k, r), config in sorted(self.configs.items()):
            manifest = config_manifest(config)
            out.append({"name": config.name, "exit_layer": k, "ratio": r, "variant": config.variant,
                        "loaded": (k, r) in self._loaded, "backend": "onnxruntime",
                        "dtype": manifest.get("dtype", "float32"), "calibration": manifest.get("calibration")})
        return out


def choose_variant(configs: Sequence[ExportedConfig], variant: str | None, where) -> dict[tuple[int, int], ExportedConfig]:
    """{(exit, ratio): config}: the shared-weight models, with ``variant``'s (e.g. ``specialist``) in place of
    theirs where there is one. Quantized copies are served only when asked for by name here too."""
    chosen = {(c.exit_layer, c.ratio): c for c in configs if c.variant is None}
    if variant is not None:
        special = [c for c in configs if c.variant == variant]
        if not special:
            kinds = sorted({c.variant for c in configs if c.variant})
            raise ServerInputError("variant", f"{where}: no {variant!r} models to serve; variants there: "
                                              f"{kinds or 'none'}")
        chosen.update({(c.exit_layer, c.ratio): c for c in special})
    return chosen


def mapped_initializers(model_file: Path) -> dict:
    """{initializer name: OrtValue} viewing the model's external weights file through one read-only memmap."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model_file), load_external_data=False)
    dtypes = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
              onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
    maps: dict[str, np.memmap] = {}
    values = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        path = model_file.parent / info["location"]
        if str(path) not in maps:
            maps[str(path)] = np.memmap(path, dtype=np.uint8, mode="r")
        raw = maps[str(path)]
        offset, length = int(info.get("offset", 0)), int(info["length"])
        array = np.frombuffer(raw, dtype=dtypes[tensor.data_type], count=length // np.dtype(dtypes[tensor.data_type]).itemsize,
                              offset=offset).reshape(tuple(tensor.dims))
        values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)
    values["__keepalive__"] = maps  # the memmaps must outlive the sessions
    return values


class TorchConfig:
    """One (exit, ratio) of a ``TorchPool``: what the server asks of a loaded config (``compute_score``,
    ``encoder``, ``manifest``), backed by the ratio's ``MatryoshkaReranker``."""

    def __init__(self, reranker, exit_layer: int, ratio: int, calibration: dict | None, batch_size: int):
        self.reranker, self.exit_layer, self.ratio, self.batch_size = reranker, exit_layer, ratio, batch_size
        self.encoder = reranker.encoder
        self.manifest = {"calibration": calibration} if calibration else {}

    def compute_score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.reranker.compute_score(list(pairs), cutoff_layers=[self.exit_layer], compress_ratio=self.ratio,
                                           batch_size=self.batch_size)


class TorchPool(Pool):
    """The PyTorch backend: ``{ratio: MatryoshkaReranker}`` (e.g. ``MatryoshkaReranker.from_pipeline(params,
    ratio)``), each scoring at its own compression; every exit of ``exit_layers`` (default: every exit
    the model has a head for) is served at every ratio. ``calibrations``: ``{(exit, ratio): Platt (a, b)}``
    from an export of the same model; configs without one answer ``raw_scores: false`` with a sigmoid."""

    def __init__(self, rerankers: dict, options: ServerOptions = ServerOptions(), version: str | None = None,
                 exit_layers: Sequence[int] | None = None, calibrations: dict | None = None, source: str = ""):
        if not rerankers:
            raise ServerInputError("models", "no PyTorch model to serve")
        self.options, self.version, self.rerankers = options, version, dict(rerankers)
        first = next(iter(self.rerankers.values()))
        for ratio, reranker in self.rerankers.items():
            if ratio > 1 and not reranker.compress_layers:
                raise ServerInputError("ratios", f"the ratio-{ratio} model has no compression layers to merge at")
            if reranker.compress_ratio not in (1, ratio):
                raise ServerInputError("ratios", f"the model given for ratio {ratio} was set up for ratio "
                                                 f"{reranker.compress_ratio} (its token adapter)")
        exits = list(first.exit_layers) if exit_layers is None else sorted(set(exit_layers))
        unknown = sorted(set(exits) - set(first.exit_layers))
        if unknown or not exits:
            raise ServerInputError("exit_layer", f"the model has no head at exit layer(s) {unknown or exits}; "
                                                 f"it has {first.exit_layers}")
        self.folder = Path(source or first.model_path)
        self.index = {"input_format": first.input_format.to_dict(), "source_model": source or str(first.model_path)}
        calibrations = calibrations or {}
        self.configs = {(k, r): TorchConfig(reranker, k, r, calibrations.get((k, r)), options.max_batch_pairs)
                        for r, reranker in sorted(self.rerankers.items()) for k in exits}
        self.default = self.default_key(self.configs)

    def get(self, key: tuple[int, int]) -> TorchConfig:
        return self.configs[key]

    def describe(self) -> list[dict]:
        return [{"name": config_name(k, r), "exit_layer": k, "ratio": r, "variant": None, "loaded": True,
                 "backend": "pytorch",
                 "dtype": str(c.reranker.dtype).removeprefix("torch."), "calibration": c.manifest.get("calibration")}
                for (k, r), c in sorted(self.configs.items())]


def pipeline_pool(params, ratios: Sequence[int] | None = None, exit_layers: Sequence[int] | None = None,
                  options: ServerOptions = ServerOptions(), dtype: str | None = None) -> TorchPool:
    """A ``TorchPool`` of the pipeline's trained model: ``from_pipeline`` per ratio (default: the exported
    ratios, ``export.ratios``), the exits ``export.exit_layers`` unless given, and the export's Platt
    calibrations where ``paths.onnx`` holds an export."""
    from ..config import Params, load_params
    from .reranker import MatryoshkaReranker

    params = params if isinstance(params, Params) else load_params(params)
    ratios = list(ratios or params.export.ratios)
    exits = list(exit_layers or params.export.exit_layers)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    rerankers = {r: MatryoshkaReranker.from_pipeline(params, ratio=r, **({"dtype": dtype} if dtype else {}))
                 for r in ratios}
    return TorchPool(rerankers, options, exit_layers=exits, calibrations=export_calibrations(params, ratios),
                     source=str(params.model.name_or_path))


def export_calibrations(params, ratios: Sequence[int]) -> dict[tuple[int, int], dict]:
    """{(exit, ratio): Platt (a, b)} of the pipeline's export (``paths.onnx``), for the ratios whose export
    was made from the very adapters ``from_pipeline`` loads (same files by sha256, same compression
    layers); a ratio exported from other adapters (retrained, not re-exported) or an unreadable export
    gets none (a plain sigmoid) and a warning: a stale calibration would answer with wrong probabilities."""
    folder = Path(params.paths.onnx)
    if not (folder / INDEX).is_file():
        return {}
    calibrations, stale = {}, set()
    try:
        configs = [c for c in read_index(folder) if c.variant is None and c.ratio in ratios]
        current = {r: [adapter_sha256(p) for p in params.adapter_stack(r)] for r in ratios}
        for config in configs:
            manifest = config_manifest(config)
            exported = [a.get("sha256") for a in manifest.get("adapters", [])]
            layers = list(manifest.get("compression", {}).get("layers", []))
            if exported != current[config.ratio] or (config.ratio > 1 and layers != list(params.compression.layers)):
                stale.add(config.ratio)
            elif manifest.get("calibration"):
                calibrations[config.exit_layer, config.ratio] = manifest["calibration"]
    except Exception as err:  # noqa: BLE001 - calibration is optional: serve with a sigmoid rather than not at all
        log.warning("%s: cannot read the export's calibration (%s); probabilities are a plain sigmoid", folder, err)
        return {}
    if stale:
        log.warning("%s: ratio(s) %s were exported from other adapters than the ones served; their probabilities "
                    "are a plain sigmoid (re-run the export stage for calibrated ones)", folder, sorted(stale))
    return {k: v for k, v in calibrations.items() if k[1] not in stale}


# --------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    pairs: list[tuple[str, str]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Per-config queue: requests arriving within ``batch_window_ms`` share one model call."""

    def __init__(self, pool: Pool, key: tuple[int, int], executor: ThreadPoolExecutor, options: ServerOptions):
        self.pool, self.key, self.executor, self.options = pool, key, executor, options
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=options.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, pairs: list[tuple[str, str]]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(pairs, future))  # QueueFull -> 429 (the caller maps it)
        return future

    async def _run(self) -> None:
        while True:  # supervised: an unexpected error fails the requests in hand, never the config's queue
            jobs: list[_Job] = []
            try:
                await self._batch(jobs)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.exception("batcher for %s: unexpected error", self.key)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)

    async def _batch(self, jobs: list[_Job]) -> None:
        """Collects one batch into ``jobs`` (the caller's list, so it can fail them), scores it, answers each."""
        loop = asyncio.get_running_loop()
        jobs.append(await self.queue.get())
        size = len(jobs[0].pairs)
        deadline = loop.time() + self.options.batch_window_ms / 1000
        while size < self.options.max_batch_pairs:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            size += len(job.pairs)
        jobs[:] = [job for job in jobs if not job.future.done()]  # a request whose client went away: not scored
        if not jobs:
            return
        pairs = [p for job in jobs for p in job.pairs]
        try:
            reranker = await loop.run_in_executor(self.executor, self.pool.get, self.key)
            scores = await loop.run_in_executor(self.executor, reranker.compute_score, pairs)
        except Exception as err:  # noqa: BLE001 - delivered to every waiting request as a 424 with a message
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(scores[offset:offset + len(job.pairs)])
            offset += len(job.pairs)


# --------------------------------------------------------------------------------- the app
class RerankRequest(BaseModel):
    """TEI's rerank request, strict about JSON types (``"2"`` is not an int), plus depth and width."""

    model_config = ConfigDict(extra="ignore")  # as TEI (serde): clients send fields it does not read (top_n, model)
    query: StrictStr = Field(min_length=1)
    texts: list[StrictStr]  # empty: TEI's 400 "Empty", answered by the handler
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None  # TEI's Option<bool>: null = the server's auto_truncate
    truncation_direction: StrictStr = "Right"  # TEI's Right | Left; Left is refused (``rerank``)
    exit_layer: StrictInt | None = None  # the Matryoshka extension: depth ...
    ratio: StrictInt | None = None  # ... and width, per request
    first_stage_scores: list[StrictFloat | StrictInt] | None = None  # fused with ours, as rank() does
    first_stage_weight: StrictFloat | StrictInt = Field(default=0.5, ge=0.0, le=1.0)


def create_app(pool: Pool, options: ServerOptions = ServerOptions()):
    """The FastAPI application (tests drive it through a real uvicorn server)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )

    registry = CollectorRegistry()
    requests = Counter("matryoshka_requests", "Re-rank requests", ["config", "status"], registry=registry)
    latency = Histogram("matryoshka_request_seconds", "Re-rank request latency", ["config"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    pairs_scored = Counter("matryoshka_pairs", "Query-text pairs scored", ["config"], registry=registry)
    queued = Gauge("matryoshka_queue_depth", "Requests waiting per config", ["config"], registry=registry)
    state: dict = {"batchers": {}, "loading": {}}

    @asynccontextmanager
    async def lifespan(app):
        state["executor"] = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="ort")
        yield
        for batcher in state["batchers"].values():  # uvicorn has already let in-flight requests finish
            batcher.task.cancel()
        state["executor"].shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="matryoshka-reranker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(PayloadLimit, limit=options.payload_limit)
    if options.api_key:
        app.add_middleware(BearerKey, key=options.api_key)  # added last: it runs first, before any body is read

    def error(status: int, message: str, kind: str = "Validation") -> JSONResponse:
        return JSONResponse({"error": message, "error_type": kind}, status_code=status)

    def load_failed(loading) -> bool:
        return loading is not None and loading.done() and not loading.cancelled() and loading.exception() is not None

    def start_load(key: tuple[int, int]) -> asyncio.Future:
        """A config's load off the event loop (sha256 of its files, a session), shared by whoever waits for it."""
        state["loading"][key] = asyncio.get_running_loop().run_in_executor(None, pool.get, key)
        return state["loading"][key]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {e.get('msg')}")
        return error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(ServerInputError)
    async def refused(request: Request, exc: ServerInputError):
        return error(exc.status, f"{exc.field}: {exc}")

    @app.exception_handler(Exception)  # anything unforeseen: TEI's JSON error shape, not a plain-text 500
    async def unexpected(request: Request, exc: Exception):  # Starlette logs the traceback itself
        return error(500, f"internal error ({type(exc).__name__}); see the server log", "Backend")

    @app.post("/rerank")
    async def rerank(body: RerankRequest, request: Request):
        if not body.texts:
            return error(400, "texts: `texts` cannot be empty", "Empty")
        if body.truncation_direction not in ("Right", "right"):
            raise ServerInputError("truncation_direction", f"{body.truncation_direction!r}: only Right (TEI's default) "
                                   "is served: the model was trained on texts cut at their end", 422)
        if len(body.texts) > options.max_texts:
            raise ServerInputError("texts", f"{len(body.texts)} texts; this server takes at most {options.max_texts} "
                                            "per request (--max-texts)")
        check_unicode(body.texts)  # before any batch: a text no tokenizer takes would fail its batch-mates too
        if body.first_stage_scores is not None:  # refused before any model work
            try:
                fuse_scores([0.0] * len(body.texts), body.first_stage_scores, body.first_stage_weight)
            except ValueError as err:
                raise ServerInputError("first_stage_scores", str(err), 422) from None
        key = pool.resolve(body.exit_layer, body.ratio)
        name = getattr(pool.configs.get(key), "name", None) or config_name(*key)  # exit-08-ratio-1-specialist too
        batcher = state["batchers"].get(key)
        if batcher is None:
            batcher = state["batchers"][key] = Batcher(pool, key, state["executor"], options)
            queued.labels(name).set_function(batcher.queue.qsize)  # read at scrape time: it also falls

        def overloaded() -> JSONResponse:
            requests.labels(name, "429").inc()
            return error(429, f"{name}: {options.max_queue} requests already queued; retry later", "Overloaded")

        if batcher.queue.full():  # before any tokenizing: a refused request costs nothing
            return overloaded()
        loop = asyncio.get_running_loop()
        loading = state["loading"].get(key)  # one load per config at a time, shared by the requests waiting
        if loading is None or loading.cancelled() or load_failed(loading):
            loading = start_load(key)  # a failed one is retried
        try:  # a config's first request loads it (sha256 of its files, a session): off the event loop
            encoder = (await asyncio.shield(loading)).encoder
        except Exception as err:  # noqa: BLE001 - the model cannot load (e.g. a damaged file): TEI's 424
            requests.labels(name, "424").inc()
            log.exception("loading %s failed", name)
            return error(424, f"{name}: model unavailable: {err}", "Backend")
        if not (options.auto_truncate if body.truncate is None else body.truncate):  # TEI: false refuses what is
            # too long, null is --auto-truncate's choice; tokenizing off the loop too
            await loop.run_in_executor(None, check_lengths, encoder, body.query, body.texts)
        started = time.perf_counter()
        try:
            future = batcher.submit([(body.query, t) for t in body.texts])
        except asyncio.QueueFull:
            return overloaded()

        async def client_gone() -> None:  # the body is read: what the server receives next is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not future.done():  # the client disconnected or timed out: its pairs leave the batch
                future.cancel()
        if future.cancelled():
            requests.labels(name, "499").inc()
            return error(499, f"{name}: the client closed the connection", "Cancelled")  # read by nobody
        try:
            scores = future.result()
        except Exception as err:  # noqa: BLE001 - TEI answers a failed backend with 424
            requests.labels(name, "424").inc()
            log.exception("scoring failed for %s", name)
            return error(424, f"{name}: scoring failed: {err}", "Backend")
        values = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(values).all():  # NaN would sort arbitrarily and is not JSON
            requests.labels(name, "424").inc()
            log.error("%s returned non-finite scores for %d of %d texts", name, int((~np.isfinite(values)).sum()),
                      len(values))
            return error(424, f"{name}: the model returned non-finite scores", "Backend")
        latency.labels(name).observe(time.perf_counter() - started)
        requests.labels(name, "200").inc()
        pairs_scored.labels(name).inc(len(body.texts))
        ours = values if body.raw_scores else probabilities(pool, key, values)
        ranked_by = ours if body.first_stage_scores is None else np.asarray(
            fuse_scores(values.tolist(), body.first_stage_scores, body.first_stage_weight))
        order = sorted(range(len(ranked_by)), key=lambda i: -ranked_by[i])  # stable: ties keep the texts' order
        return [{"index": i, "score": float(ranked_by[i]),
                 **({"reranker_score": float(ours[i])} if body.first_stage_scores is not None else {}),
                 **({"text": body.texts[i]} if body.return_text else {})} for i in order]

    # TEI's aliases: a reranker answers POST / and /invocations (Inference Endpoints, SageMaker) as /rerank
    app.post("/", include_in_schema=False)(rerank)
    app.post("/invocations", include_in_schema=False)(rerank)

    @app.get("/health")
    async def health():
        """200 unless the default config's latest load failed (TEI's 503 Unhealthy); configs load on their first
        request, and a failed load is retried by the next one."""
        if load_failed(state["loading"].get(pool.default)):
            now = time.monotonic()  # behind a readiness probe no request may come to retry it: the check does
            if now >= state.get("health_retry", 0.0):
                state["health_retry"] = now + 10.0
                start_load(pool.default)
            return error(503, f"{config_name(*pool.default)}: the default model failed to load: see the server log",
                         "Unhealthy")
        return {"status": "ok"}

    app.get("/ping", include_in_schema=False)(health)
    app.get("/", include_in_schema=False)(health)

    @app.get("/info")
    async def info():
        """TEI's Info fields (router/src/lib.rs: clients tell a reranker by ``model_type``), then ours: the
        configs, the default, the input format. ``version`` is the served release (TEI: its router's version)."""
        fmt = pool.index.get("input_format") or {}
        configs = pool.describe()
        default = next(c for c in configs if (c["exit_layer"], c["ratio"]) == pool.default)
        model_id = pool.index.get("source_model") or str(pool.folder)
        max_input_length = fmt.get("query_max_len", 0) + fmt.get("passage_max_len", 0)
        return {"model_id": model_id, "model_sha": None, "model_dtype": default.get("dtype", "float32"),
                "served_model_name": model_id,
                "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
                "max_concurrent_requests": options.max_queue * len(configs), "max_input_length": max_input_length,
                "max_batch_tokens": max_input_length * options.max_batch_pairs, "max_batch_requests": None,
                "max_client_batch_size": options.max_texts, "auto_truncate": options.auto_truncate,
                "tokenization_workers": options.workers, "version": pool.version or __version__, "sha": None, "docker_label": None,
                "configs": configs, "default": {"exit_layer": pool.default[0], "ratio": pool.default[1]},
                "max_queue": options.max_queue, "max_batch_pairs": options.max_batch_pairs,
                "payload_limit": options.payload_limit, "server": f"matryoshka-reranker {__version__}",
                "input_format": fmt}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app


class BearerKey:
    """ASGI middleware, TEI's ``--api-key``: every request but the health checks (``GET /health``, ``/ping``, ``/``:
    what load balancers and orchestrators poll without credentials) needs ``Authorization: Bearer <key>``; any
    other is a 401 JSON error, compared in constant time."""

    OPEN = {("GET", "/health"), ("GET", "/ping"), ("GET", "/")}

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or (scope["type"] == "http" and (scope["method"], scope["path"]) in self.OPEN):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websocket routes: anything else is closed, never passed through unchecked
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return None
        import hmac

        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        response = JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)",
                                 "error_type": "Unauthorized"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class PayloadLimit:
    """ASGI middleware, TEI's ``--payload-limit``: a body over ``limit`` bytes is a 413 JSON error, refused from
    its Content-Length before any of it is read, or, sent chunked, once what arrived passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server reads no more than it says
            if length.strip().isdigit() and int(length) > self.limit:
                return await self.refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # chunked: read up to the limit here, then hand the body on
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        message = f"body: over this server's {self.limit} bytes per request (--payload-limit)"
        await JSONResponse({"error": message, "error_type": "Validation"}, status_code=413)(scope, receive, send)


def check_unicode(texts: Sequence[str]) -> None:
    """JSON may escape a lone surrogate (``"\\ud800"``), which no tokenizer takes: refused naming the text (the
    query's ``min_length`` already makes pydantic refuse one there)."""
    for i, text in enumerate(texts):
        if not text.isascii() and not is_valid_unicode(text):
            raise ServerInputError(f"texts[{i}]", "not valid Unicode (a lone surrogate escape)", 422)


def check_lengths(encoder, query: str, texts: Sequence[str]) -> None:
    """With ``truncate: false``, a query or text over the model's token budget is refused, not cut: the
    same budget ``PairEncoder.encode_many`` cuts at (``PairEncoder.over_budget``)."""
    problem = encoder.over_budget(query, texts)
    if problem:
        field_name, why = problem
        raise ServerInputError(field_name, f"{why}; send truncate: true to cut it")


def probabilities(pool: Pool, key: tuple[int, int], scores: np.ndarray) -> np.ndarray:
    """Calibrated probabilities when the config's manifest carries Platt (a, b), else a sigmoid."""
    return calibrated_probability(pool.get(key).manifest.get("calibration"), scores)


def serve(models: str | os.PathLike | Pool, host: str = "127.0.0.1", port: int = 8080,
          options: ServerOptions = ServerOptions(), version: str | None = None,
          graceful_seconds: float = 30.0, exit_layers: Sequence[int] | None = None, variant: str | None = None) -> None:
    """Runs the server until SIGTERM/SIGINT (in-flight requests finish first). ``models``: an export
    folder, a list of exported model folders, or a ready pool (``pipeline_pool`` for PyTorch);
    ``variant="specialist"`` serves the exit specialists in place of their exits' shared-weight models."""
    import uvicorn

    pool = models if isinstance(models, Pool) else ModelPool(models, options, version, exit_layers, variant)
    if options.api_key:
        log.info("requests need `Authorization: Bearer <key>` (--api-key or API_KEY in the environment); health "
                 "checks stay open")
    log.info("serving %d configs from %s on http://%s:%d (default exit %d, ratio %d)", len(pool.configs),
             pool.folder if isinstance(models, Pool) else models, host, port, *pool.default)
    uvicorn.run(create_app(pool, options), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=graceful_seconds)
