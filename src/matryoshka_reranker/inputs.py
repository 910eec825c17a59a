"""The model's input format, written once for training, scoring, export and evaluation.

A pair becomes ``[bos] A: query \\n B: passage \\n prompt`` (as upstream FlagEmbedding's layer-wise
reranker), right padded. Compression needs to know where the passage is, so every encoded pair
carries ``query_length`` (bos + "A: query" + separator) and ``prompt_length`` (separator + prompt);
the passage is everything in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_PROMPT = "Predict whether passage B contains an answer to query A."


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    query_length: int
    prompt_length: int

    @property
    def passage_length(self) -> int:
        return len(self.input_ids) - self.query_length - self.prompt_length


class PairEncoder:
    """Tokenises (query, passage) pairs into the Matryoshka input format.

    ``max_length`` bounds ``[bos] + query + sep + passage`` (the separator and prompt come on top,
    as upstream). The query is cut to ``query_max_len`` tokens (default 3/4 of ``max_length``) and
    the passage to ``passage_max_len`` and then to whatever room the query left.
    """

    def __init__(
        self,
        tokenizer,
        prompt: str = DEFAULT_PROMPT,
        max_length: int = 512,
        query_max_len: int | None = None,
        passage_max_len: int | None = None,
    ):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_length = max_length
        self.query_max_len = query_max_len or max_length * 3 // 4
        self.passage_max_len = passage_max_len or max_length
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.sep = self._ids("\n")
        self.pad_token_id = _pad_id(tokenizer)
        self._prompt_cache: dict[str, list[int]] = {}

    def _ids(self, text: str, limit: int | None = None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if limit is None else ids[:limit]

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.sep + self._ids(prompt)
        return self._prompt_cache[prompt]

    def encode(self, query: str, passage: str, prompt: str | None = None) -> EncodedPair:
        if not isinstance(query, str) or not isinstance(passage, str):
            raise TypeError(
                f"query and passage must be strings, got {type(query).__name__} and {type(passage).__name__}"
            )
        head = self.bos + self._ids(f"A: {query}", self.query_max_len) + self.sep
        room = max(self.max_length - len(head), 0)
        body = self._ids(f"B: {passage}", min(self.passage_max_len, room))
        tail = self._prompt_ids(self.prompt if prompt is None else prompt)
        return EncodedPair(head + body + tail, len(head), len(tail))

    def collate(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """Right-pads a batch: input_ids and attention_mask (B, T); query/prompt lengths (B,)."""
        import torch

        width = max(len(p.input_ids) for p in pairs)
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            input_ids[row, : len(pair.input_ids)] = torch.tensor(pair.input_ids)
            attention_mask[row, : len(pair.input_ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_lengths": torch.tensor([p.query_length for p in pairs], dtype=torch.long),
            "prompt_lengths": torch.tensor([p.prompt_length for p in pairs], dtype=torch.long),
        }


def as_pair_list(pairs) -> tuple[list, bool]:
    """``compute_score``'s input as a list of pairs, and whether one bare ``(query, passage)`` was given."""
    single = isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
    pairs = [pairs] if single else list(pairs)
    if not pairs:
        raise ValueError("compute_score needs at least one (query, passage) pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pair {i} must be a (query, passage) tuple, got {pair!r:.80}")
    return pairs, single


def yes_token_id(tokenizer) -> int:
    """The token whose LM-head row initialises the score heads (first piece of "Yes")."""
    ids = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the tokenizer maps 'Yes' to no tokens; cannot initialise the score heads")
    return ids[0]


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
