"""``rank()``: one query, many documents, best first, in sentence-transformers' result shape.

Shared by the PyTorch and ONNX Runtime rerankers (torch-free).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def rank_documents(score: Callable[[list[tuple[str, str]]], Sequence[float]], query: str, documents: Sequence[str],
                   top_k: int | None = None, return_documents: bool = False) -> list[dict]:
    """``[{"corpus_id": i, "score": s(, "text": documents[i])}]`` sorted by score, best first.

    Ties keep the documents' order (a stable sort), so results are deterministic.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise TypeError("documents must be a list of strings")
    if not documents:
        raise ValueError("rank needs at least one document")
    bad = [i for i, d in enumerate(documents) if not isinstance(d, str)]
    if bad:
        raise TypeError(f"documents[{bad[0]}] is {type(documents[bad[0]]).__name__}, not a string")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    scores = score([(query, d) for d in documents])
    scores = [scores] if isinstance(scores, float) else list(scores)
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    results = []
    for i in order[:top_k]:
        item = {"corpus_id": i, "score": float(scores[i])}
        if return_documents:
            item["text"] = documents[i]
        results.append(item)
    return results
