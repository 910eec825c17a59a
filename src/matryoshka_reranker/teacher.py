"""Teacher scoring: fills ``pos_scores`` / ``neg_scores`` of every training line.

Three kinds of teacher (``teacher.kind``):

* ``bi_encoder``: cosine of mean-pooled, L2-normalised embeddings (default: the embedded
  all-MiniLM-L6-v2). Each distinct query and passage is embedded once per shard.
* ``cross_encoder``: an HF sequence-classification model; the score is its logit (one label) or
  the logit difference last-minus-first label (two or more).
* ``matryoshka``: a Matryoshka / causal-LM re-ranker folder; its full-depth score.

Scores are multiplied by ``teacher.score_scale`` (default 20 for cosines, whose [-1, 1] range
would give an almost flat softmax, 1 for the logit-valued kinds), so training sees logits.

The run is resumable: lines are scored in shards of ``teacher.shard_size`` under
``paths.teacher_shards``; a shard whose input lines and teacher match its recorded fingerprint is
not scored again. The merged file is written atomically; each line records its ``teacher``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .assets import resolve_model_path
from .atomic import atomic_file, sha256_file, write_json
from .config import Params, TeacherParams
from .data import iter_jsonl, parse_example
from .hardware import pick_device, pick_dtype

log = logging.getLogger(__name__)

SHARD_FORMAT = 1
Progress = Callable[[int], None]


def score_scale(params: TeacherParams) -> float:
    if params.score_scale is not None:
        return params.score_scale
    return 20.0 if params.kind == "bi_encoder" else 1.0


def teacher_identity(params: TeacherParams) -> dict:
    """What determines the scores; recorded per line and in every shard's fingerprint."""
    return {"kind": params.kind, "name_or_path": params.name_or_path, "max_length": params.max_length,
            "score_scale": score_scale(params)}


# ------------------------------------------------------------------------------------ teachers
class BiEncoderTeacher:
    """Cosine similarity of mean-pooled embeddings (sentence-transformers' recipe)."""

    def __init__(self, params: TeacherParams):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(params.name_or_path)
        self.device = pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=pick_dtype("auto", self.device)).to(self.device).eval()
        self.batch_size, self.max_length = params.batch_size, params.max_length

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], progress: Progress) -> torch.Tensor:
        """(N, D) unit vectors, batched by length."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (b, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (b, D)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
            progress(len(rows))
        return out

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        texts = list(dict.fromkeys([*queries, *passages]))  # each distinct text once
        position = {t: i for i, t in enumerate(texts)}
        vectors = self.embed(texts, progress)  # (N, D)
        q = vectors[[position[t] for t in queries]]
        p = vectors[[position[t] for t in passages]]
        return (q * p).sum(-1).tolist()

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(set(queries) | set(passages))


class CrossEncoderTeacher:
    """An HF sequence-classification cross-encoder."""

    def __init__(self, params: TeacherParams):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(params.name_or_path)
        self.device = pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=pick_dtype("auto", self.device)).to(self.device).eval()
        self.batch_size, self.max_length = params.batch_size, params.max_length

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        order = sorted(range(len(queries)), key=lambda i: -(len(queries[i]) + len(passages[i])))
        scores = [0.0] * len(queries)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer([queries[i] for i in rows], [passages[i] for i in rows], padding=True,
                                   truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()  # (b, labels)
            values = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]
            for i, value in zip(rows, values.tolist()):
                scores[i] = value
            progress(len(rows))
        return scores

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(queries)


class MatryoshkaTeacher:
    """A Matryoshka re-ranker (or raw causal LM) scored at its deepest exit."""

    def __init__(self, params: TeacherParams, prompt: str):
        from .reranker import MatryoshkaReranker

        self.reranker = MatryoshkaReranker(params.name_or_path, batch_size=params.batch_size,
                                           max_length=params.max_length, prompt=prompt)
        self.batch_size = params.batch_size

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], progress: Progress) -> list[float]:
        scores = []
        for start in range(0, len(queries), self.batch_size * 8):  # chunks, so the bar moves
            chunk = list(zip(queries[start : start + self.batch_size * 8], passages[start : start + self.batch_size * 8]))
            scores += self.reranker.compute_score(chunk, cutoff_layers=[self.reranker.exit_layers[-1]])
            progress(len(chunk))
        return scores

    def work(self, queries: Sequence[str], passages: Sequence[str]) -> int:
        return len(queries)


def load_teacher(params: Params):
    kind = params.teacher.kind
    if kind == "bi_encoder":
        return BiEncoderTeacher(params.teacher)
    if kind == "cross_encoder":
        return CrossEncoderTeacher(params.teacher)
    return MatryoshkaTeacher(params.teacher, params.model.prompt)


# -------------------------------------------------------------------------------------- shards
def _fingerprint(identity: dict, lines: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps({"format": SHARD_FORMAT, "teacher": identity}, sort_keys=True).encode())
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
    scores = [s * scale for s in teacher.score_pairs(*_pairs(lines), progress)]
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
    identity = teacher_identity(params.teacher)
    scale = score_scale(params.teacher)
    lines = []
    for number, obj in iter_jsonl(source):
        parse_example(obj, f"{source}:{number}")  # validate before any scoring
        lines.append((number, obj))
    if not lines:
        raise ValueError(f"{source}: no training examples")
    size = params.teacher.shard_size
    shards = [lines[i : i + size] for i in range(0, len(lines), size)]
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan = []
    for index, shard in enumerate(shards):
        raw = [json.dumps(obj, sort_keys=True, ensure_ascii=False) for _, obj in shard]
        path, meta = shard_dir / f"shard-{index:05d}.jsonl", shard_dir / f"shard-{index:05d}.json"
        plan.append((index, shard, path, meta, _fingerprint(identity, raw)))
    todo = [p for p in plan if not _shard_done(p[2], p[3], p[4])]
    log.info("teacher %s: %d lines in %d shards, %d already scored", identity["kind"], len(lines), len(plan),
             len(plan) - len(todo))
    if todo:
        teacher = teacher or load_teacher(params)
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
    """Every (query, passage) of a shard, line by line, positives first."""
    queries, passages = [], []
    for _, obj in shard:
        for passage in [*obj["pos"], *obj["neg"]]:
            queries.append(obj["query"])
            passages.append(passage)
    return queries, passages
