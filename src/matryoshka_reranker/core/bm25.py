"""BM25 (bm25s): the first stage of the default data, and the lexical half of the hybrid teacher."""

from __future__ import annotations


class BM25Index:
    """bm25s over a corpus dict; ``search`` returns (doc id, score) lists, best first."""

    def __init__(self, corpus: dict[str, str]):
        import bm25s

        self.doc_ids = list(corpus)
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize(list(corpus.values())), show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.doc_ids))
        docs, scores = self.retriever.retrieve(self._tokenize(queries), k=k, show_progress=False)
        return [
            [(self.doc_ids[int(d)], float(s)) for d, s in zip(row_docs, row_scores)]
            for row_docs, row_scores in zip(docs, scores)
        ]

    def score_docs(self, queries: list[str], positions: list[int]) -> list[float]:
        """BM25 score of document ``positions[i]`` (index into the corpus order) for ``queries[i]``."""
        cache: dict[str, object] = {}
        out = []
        for query, position in zip(queries, positions):
            if query not in cache:
                tokens = self._tokenize([query])[0]
                known = [t for t in tokens if t in self.retriever.vocab_dict]
                cache[query] = self.retriever.get_scores(known) if known else None
            scores = cache[query]
            out.append(0.0 if scores is None else float(scores[position]))
        return out
