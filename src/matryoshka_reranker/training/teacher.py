"""Teacher scoring: fills ``pos_scores`` / ``neg_scores`` of every training line.

Four kinds of teacher (``teacher.kind``):

* ``bi_encoder``: cosine similarity from ``sentence_transformers.SentenceTransformer.encode``
  (normalised embeddings, each model's own pooling; default: the embedded all-MiniLM-L6-v2).
  Each distinct query and passage is embedded once per shard.
* ``cross_encoder``: ``sentence_transformers.CrossEncoder.predict`` logits (an HF
  sequence-classification re-ranker folder).
* ``matryoshka``: a Matryoshka / causal-LM re-ranker folder (plus ``adapters``); its score at
  ``exit_layer`` (default the deepest), with the pipeline's ``model.start_layer`` / ``layer_sep``, in
  the input format saved with it (the pipeline's format for a raw checkpoint).
* ``hybrid``: a fusion of the first-stage lexical score and a neural score, as rank fusion does in
  hybrid search: per training line, BM25 (over the distinct passages of the whole training file)
  and the neural score are each min-max normalised over the line's passages and mixed
  ``hybrid_weight * bm25 + (1 - hybrid_weight) * neural``. On SciFact the bi-encoder alone
  ranks *below* BM25 (0.645 vs 0.662 nDCG@10) while their fusion ranks above both (0.710); a
  student distilled from a teacher below the first stage is capped below it. The neural half can
  also be a trained Matryoshka re-ranker (``hybrid_neural: matryoshka``, its ``adapters``): a
  second round of distillation from the first round's model fused with BM25, a teacher above
  both (0.741 on the SciFact test candidates, README).

A Matryoshka teacher is ``name_or_path`` with ``adapters`` merged in order, scored at
``exit_layer`` (default its deepest exit); each adapter's digest (config, weights, input format) and
the input format it scores in are part of the teacher's identity, so retrained adapters re-score
every shard once the stage runs (DVC does not track the adapter folders: after retraining them, run
``dvc repro -f -s teacher_score``).

Scores are multiplied by ``teacher.score_scale`` (default 20 for cosines, whose [-1, 1] range
would give an almost flat softmax, 10 for the hybrid's [0, 1], 1 for logit-valued kinds), so
training sees logits.

The run is resumable: lines are scored in shards of ``teacher.shard_size`` under
``paths.teacher_shards``; a shard whose input lines and teacher match its recorded fingerprint is
not scored again. The merged file is written atomically; each line records its ``teacher``.
A non-finite teacher score is an error for its shard, which is then not recorded as done. A training
file whose every line already carries ``pos_scores`` / ``neg_scores`` (the user's own teacher) keeps
them; when only some lines do, every line is scored (one teacher, one score scale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import Params, TeacherParams
from ..core.assets import resolve_model_path
from ..core.atomic import atomic_file, sha256_file, write_json
from ..core.distributed import barrier, rank_and_world
from ..core.errors import CheckFailed
from ..core.hardware import keep_freed_memory, pick_device, pick_dtype, warm_cpu_math
from ..core.jsonl import read_jsonl
from .data import parse_example
from .trainer import code_digest

log = logging.getLogger(__name__)

SHARD_FORMAT = 2
Progress = Callable[[int], None]


class TeacherScoreError(CheckFailed):
    """The teacher produced a NaN or infinite score; its shard is not recorded as done."""


def score_scale(params: TeacherParams) -> float:
    if params.score_scale is not None:
        return params.score_scale
    return {"bi_encoder": 20.0, "hybrid": 10.0}.get(params.kind, 1.0)


def teacher_identity(params: Params) -> dict:
    """What determines the scores; recorded per line and in every shard's fingerprint."""
    teacher = params.teacher
    identity = {"kind": teacher.kind, "name_or_path": teacher.name_or_path, "max_length": teacher.max_length,
                "score_scale": score_scale(teacher)}
    if teacher.kind == "cross_encoder":  # shards scored before were sigmoids, not logits: not reused
        identity["output"] = "logits"
    if teacher.kind == "hybrid":
        identity["hybrid_weight"] = teacher.hybrid_weight
        identity["hybrid_neural"] = teacher.hybrid_neural
    if teacher.adapters:  # content, not just the path: a retrained adapter is another teacher
        identity["adapters"] = [{"path": a, "sha256": _adapter_digest(Path(a))} for a in teacher.adapters]
    if teacher.exit_layer is not None:
        identity["exit_layer"] = teacher.exit_layer
    if teacher.neural == "matryoshka":  # what it reads, and where its exits are
        identity["input_format"] = matryoshka_format(teacher, params.model.input_format).to_dict()
        identity["start_layer"], identity["layer_sep"] = params.model.start_layer, params.model.layer_sep
    return identity


def matryoshka_format(params: TeacherParams, pipeline_format):
    """The input format a Matryoshka teacher scores in: the one saved with it (base or adapters, which
    must agree), else the pipeline's (a raw checkpoint)."""
    from ..model.inputs import InputFormat, resolve_format

    folders = [resolve_model_path(params.name_or_path), *map(Path, params.adapters)]
    saved = any(InputFormat.load(f) is not None for f in folders)
    return resolve_format(folders, None if saved else pipeline_format)


def _adapter_digest(folder: Path) -> str:
    """sha256 of a LoRA folder's config, weights and saved input format (what makes it this adapter)."""
    files = [folder / "adapter_config.json", *sorted(folder.glob("adapter_model.*")),
             *sorted(folder.glob("input_format.json"))]
    if not files[0].is_file() or len(files) < 2:
        raise FileNotFoundError(f"teacher.adapters: {folder} is not a LoRA adapter folder "
                                "(needs adapter_config.json and adapter_model.*)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ teachers
class BiEncoderTeacher:
    """Cosine similarity of normalised sentence-transformers embeddings."""

    def __init__(self, params: TeacherParams):
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(params.name_or_path)
        warm_cpu_math()  # core/hardware.py: oneMKL's first-call race
        keep_freed_memory()  # and no page faults for every activation
        self.model = SentenceTransformer(str(path), device=str(pick_device()), local_files_only=True)
        self.model.max_seq_length = params.max_length
        self.batch_size = params.batch_size

    def embed(self, texts: Sequence[str], progress: Progress):
        """(N, D) unit vectors (numpy); encoded in chunks so the progress bar moves."""
        import numpy as np

        chunks, step = [], self.batch_size * 8
        for start in range(0, len(texts), step):
            part = list(texts[start : start + step])
            chunks.append(self.model.encode(part, batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False))
            progress(len(part))
        return np.concatenate(chunks)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        texts = list(dict.fromkeys([*queries, *passages]))  # each distinct text once
        position = {t: i for i, t in enumerate(texts)}
        vectors = self.embed(texts, progress)  # (N, D)
        q = vectors[[position[t] for t in queries]]
        p = vectors[[position[t] for t in passages]]
        return (q * p).sum(-1).astype(float).tolist()

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(set(queries) | set(passages))


class CrossEncoderTeacher:
    """A sentence-transformers ``CrossEncoder`` (any HF sequence-classification re-ranker folder)."""

    def __init__(self, params: TeacherParams):
        from sentence_transformers import CrossEncoder

        path = resolve_model_path(params.name_or_path)
        warm_cpu_math()  # core/hardware.py: oneMKL's first-call race
        keep_freed_memory()  # and no page faults for every activation
        self.model = CrossEncoder(str(path), max_length=params.max_length, device=str(pick_device()),
                                  local_files_only=True)
        self.batch_size = params.batch_size

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        from torch import nn

        scores, step = [], self.batch_size * 8
        for start in range(0, len(queries), step):
            pairs = list(zip(queries[start : start + step], passages[start : start + step]))
            # Identity: activation_fn=None means the model's default, a sigmoid for one label (not logits)
            logits = self.model.predict(pairs, batch_size=self.batch_size, activation_fn=nn.Identity(),
                                        convert_to_numpy=True, show_progress_bar=False)
            if logits.ndim == 2:  # several labels: last minus first (relevant minus not)
                logits = logits[:, -1] - logits[:, 0] if logits.shape[1] > 1 else logits[:, 0]
            scores += logits.astype(float).tolist()
            progress(len(pairs))
        return scores

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(queries)


class MatryoshkaTeacher:
    """A Matryoshka re-ranker (or raw causal LM, plus any ``adapters``) scored at ``exit_layer``."""

    def __init__(self, params: TeacherParams, input_format, start_layer: int | None = None,
                 layer_sep: int | None = None):
        from ..serving.reranker import MatryoshkaReranker

        # a trained teacher keeps its own format; a raw one uses ours (merge_adapters refuses a non-adapter).
        # Its scores are training targets: the training dtype (fp32 on any CPU), not scoring's AMX bf16
        self.reranker = MatryoshkaReranker(resolve_model_path(params.name_or_path), peft_path=params.adapters or None,
                                           batch_size=params.batch_size,
                                           input_format=matryoshka_format(params, input_format),
                                           start_layer=start_layer, layer_sep=layer_sep,
                                           compress_ratio=1,  # a teacher scores at full width (its identity
                                           dtype=pick_dtype(None, pick_device()))  # records no width)
        self.exit = params.exit_layer or self.reranker.exit_layers[-1]
        if self.exit not in self.reranker.exit_layers:
            raise ValueError(f"teacher.exit_layer {self.exit}: the teacher's exits are {self.reranker.exit_layers}")
        self.batch_size = params.batch_size

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        scores, step = [], self.batch_size * 8
        for start in range(0, len(queries), step):  # chunks, so the bar moves
            chunk = list(zip(queries[start : start + step], passages[start : start + step]))
            scores += self.reranker.compute_score(chunk, cutoff_layers=[self.exit])
            progress(len(chunk))
        return scores

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(queries)


class HybridTeacher:
    """Per-line min-max fusion of BM25 and a bi-encoder or Matryoshka score (see the module docstring)."""

    def __init__(self, params: TeacherParams, all_passages: Sequence[str], input_format=None,
                 start_layer: int | None = None, layer_sep: int | None = None):
        from ..core.bm25 import BM25Index

        self.neural = BiEncoderTeacher(params) if params.hybrid_neural == "bi_encoder" else \
            MatryoshkaTeacher(params, input_format, start_layer, layer_sep)
        self.weight = params.hybrid_weight
        passages = list(dict.fromkeys(all_passages))
        self.index = BM25Index(dict(zip(map(str, range(len(passages))), passages)))
        self.position = {p: i for i, p in enumerate(passages)}

    def score_lines(self, lines: list[dict], progress: Progress) -> list[float]:
        queries, passages = _pairs_of(lines)
        neural = self.neural.score_pairs(queries, passages, progress)
        lexical = self.index.score_docs(queries, [self.position[p] for p in passages])
        from ..serving.ranking import fuse

        fused, cursor = [], 0
        for obj in lines:
            n = len(obj["pos"]) + len(obj["neg"])
            fused += fuse(lexical[cursor:cursor + n], neural[cursor:cursor + n], self.weight)  # NaN stays NaN
            cursor += n
        return fused

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return self.neural.work(queries, passages)


def load_teacher(params: Params, all_passages: Sequence[str] = ()):
    kind = params.teacher.kind
    if kind == "bi_encoder":
        return BiEncoderTeacher(params.teacher)
    if kind == "cross_encoder":
        return CrossEncoderTeacher(params.teacher)
    m = params.model
    if kind == "hybrid":
        return HybridTeacher(params.teacher, all_passages, m.input_format, m.start_layer, m.layer_sep)
    return MatryoshkaTeacher(params.teacher, m.input_format, m.start_layer, m.layer_sep)


# -------------------------------------------------------------------------------------- shards
def _fingerprint(identity: dict, code: str, lines: Sequence[str]) -> str:
    # the code too (the stage's code deps): DVC re-runs this stage after a change there (say, the hybrid's
    # fusion), and its run must not keep the earlier code's scores
    digest = hashlib.sha256(json.dumps({"format": SHARD_FORMAT, "teacher": identity, "code": code},
                                       sort_keys=True).encode())
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _shard_done(shard: Path, meta: Path, fingerprint: str) -> bool:
    if not (shard.exists() and meta.exists()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded.get("fingerprint") == fingerprint and recorded.get("sha256") == sha256_file(shard)


def _score_shard(teacher, lines: list[tuple[int, dict]], identity: dict, scale: float, progress: Progress) -> list[dict]:
    objs = [obj for _, obj in lines]
    raw = teacher.score_lines(objs, progress) if hasattr(teacher, "score_lines") else \
        teacher.score_pairs(*_pairs_of(objs), progress)
    bad = [i for i, s in enumerate(raw) if not math.isfinite(s)]
    if bad:
        raise TeacherScoreError(f"teacher {identity['kind']} gave {len(bad)} non-finite score(s) in the shard starting "
                                f"at line {lines[0][0]}; nothing of that shard was recorded")
    scores = [s * scale for s in raw]
    out, cursor = [], 0
    for _, obj in lines:
        n_pos, n_neg = len(obj["pos"]), len(obj["neg"])
        row = dict(obj)
        row["pos_scores"] = scores[cursor : cursor + n_pos]
        row["neg_scores"] = scores[cursor + n_pos : cursor + n_pos + n_neg]
        row["teacher"] = identity
        cursor += n_pos + n_neg
        out.append(row)
    return out


def score_training_file(params: Params, teacher=None) -> Path:
    """Scores ``paths.train_groups`` into ``paths.teacher_scored``, shard by shard (resumable).

    ``teacher`` may be given (tests); otherwise it is loaded only if some shard needs scoring.
    """
    from tqdm.auto import tqdm

    source, target = Path(params.paths.train_groups), Path(params.paths.teacher_scored)
    shard_dir = Path(params.paths.teacher_shards)
    identity = teacher_identity(params)
    scale = score_scale(params.teacher)
    lines, provided = [], 0
    for number, (where, obj) in enumerate(read_jsonl(source, what="training groups"), 1):
        provided += parse_example(obj, where).has_scores  # validate before any scoring
        lines.append((number, obj))
    if lines and provided == len(lines):  # the user's own teacher scores (README, "Your own data"): kept
        if rank_and_world()[0] == 0:
            with atomic_file(target, encoding="utf-8") as handle:
                for _, obj in lines:
                    handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
        log.info("%s: every line carries pos_scores/neg_scores: kept, not scored again", source)
        return target
    if provided:  # one teacher for every line, not two score scales in one training set
        log.warning("%s: %d of %d lines carry pos_scores/neg_scores, the others none: every line is scored by "
                    "teacher %s", source, provided, len(lines), identity["kind"])
    all_passages = [p for _, obj in lines for p in [*obj["pos"], *obj["neg"]]]
    if params.teacher.kind == "hybrid":  # BM25 statistics come from the whole file: part of every shard's identity
        identity["bm25_corpus_sha256"] = hashlib.sha256("\n".join(sorted(set(all_passages))).encode()).hexdigest()
    if not lines:
        raise ValueError(f"{source}: no training examples")
    size = params.teacher.shard_size
    shards = [lines[i : i + size] for i in range(0, len(lines), size)]
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan, code = [], code_digest()  # hashed once, not per shard
    for index, shard in enumerate(shards):
        raw = [json.dumps(obj, sort_keys=True, ensure_ascii=False) for _, obj in shard]
        path, meta = shard_dir / f"shard-{index:05d}.jsonl", shard_dir / f"shard-{index:05d}.json"
        plan.append((index, shard, path, meta, _fingerprint(identity, code, raw)))
    rank, world = rank_and_world()
    done = {p[0] for p in plan if _shard_done(p[2], p[3], p[4])}  # hashes every shard once
    todo = [p for p in plan if p[0] % world == rank and p[0] not in done]  # this worker's shards
    log.info("teacher %s: %d lines in %d shards, %d already scored; worker %d of %d scores %d", identity["kind"],
             len(lines), len(plan), len(done), rank, world, len(todo))
    if todo:
        teacher = teacher or load_teacher(params, all_passages)
        total = sum(teacher.work(*_pairs(shard)) for _, shard, *_ in todo)
        with tqdm(total=total, desc=f"teacher {identity['kind']}", unit="text" if identity["kind"] == "bi_encoder"
                  else "pair", disable=None) as bar:
            for index, shard, path, meta, fingerprint in todo:
                rows = _score_shard(teacher, shard, identity, scale, bar.update)
                with atomic_file(path, encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                write_json(meta, {"format": SHARD_FORMAT, "fingerprint": fingerprint, "sha256": sha256_file(path),
                                  "lines": len(rows), "first_line": shard[0][0], "teacher": identity})
    if world > 1:
        barrier()  # every worker's shards are written
        if rank != 0:
            return target  # worker 0 merges
        missing = [p[2].name for p in plan if not _shard_done(p[2], p[3], p[4])]
        if missing:
            raise TeacherScoreError(f"shards {missing} were not scored by their workers")
    for stale in sorted(shard_dir.glob("shard-*.json*")):  # shards of an older, longer input
        if int(stale.name[6:11]) >= len(plan):
            stale.unlink()
    with atomic_file(target, "wb") as out:
        for _, _, path, _, _ in plan:
            out.write(path.read_bytes())
    write_json(shard_dir / "manifest.json", {"format": SHARD_FORMAT, "teacher": identity, "source": str(source),
                                             "lines": len(lines), "shards": len(plan)})
    log.info("wrote %s (%d lines)", target, len(lines))
    return target


def _pairs(shard: list[tuple[int, dict]]) -> tuple[list[str], list[str]]:
    return _pairs_of([obj for _, obj in shard])


def _pairs_of(lines: list[dict]) -> tuple[list[str], list[str]]:
    """Every (query, passage) of some lines, line by line, positives first."""
    queries, passages = [], []
    for obj in lines:
        for passage in [*obj["pos"], *obj["neg"]]:
            queries.append(obj["query"])
            passages.append(passage)
    return queries, passages
