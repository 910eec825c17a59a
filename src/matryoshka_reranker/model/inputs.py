"""The model's input format, written once for training, scoring, export, evaluation and serving.

A pair becomes ``[bos] A: query \\n B: passage \\n prompt`` (as upstream FlagEmbedding's layer-wise
reranker), right padded. Compression needs to know where the passage is, so every encoded pair
carries ``query_length`` (bos + "A: query" + separator) and ``prompt_length`` (separator + prompt);
the passage is everything in between.

``InputFormat`` is the contract: the prompt and the token budgets. It is built from
``params.model`` once, saved next to every trained adapter (``input_format.json``) and in every
export's manifest, and a loaded model scores with the format it was trained with unless told
otherwise. ``PairEncoder`` applies it with a tokenizer. This module imports neither torch nor
transformers, so ONNX serving can use it with only ``tokenizers`` and numpy installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError

DEFAULT_PROMPT = "Predict whether passage B contains an answer to query A."
FORMAT_FILE = "input_format.json"
TEMPLATE = "[bos] A: {query}\\nB: {passage}\\n{prompt}"  # documentation of the layout below
QUERY_PREFIX, PASSAGE_PREFIX = "A: ", "B: "  # the template's two prefixes, as PairEncoder writes them
FORMAT_VERSION = 1


class InputFormatError(InputError):
    """Two parts of a model (or a model and its params) disagree on the input format."""


@dataclass(frozen=True)
class InputFormat:
    """How a (query, passage) pair becomes tokens: the prompt and the token budgets.

    ``query_max_len`` bounds ``A: query`` and ``passage_max_len`` bounds ``B: passage`` (in tokens,
    before the separator and prompt, which always come in full). ``max_length`` is their sum.
    """

    prompt: str = DEFAULT_PROMPT
    query_max_len: int = 32
    passage_max_len: int = 96

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputFormatError("the prompt must be a non-empty string")
        for name in ("query_max_len", "passage_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 4:
                raise InputFormatError(f"{name} must be an integer >= 4, got {value!r}")

    @property
    def max_length(self) -> int:
        return self.query_max_len + self.passage_max_len

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "template": TEMPLATE, "padding_side": "right", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "input format") -> InputFormat:
        if not isinstance(data, dict):
            raise InputFormatError(f"{source}: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputFormatError(f"{source}: input format version {version!r} is newer than this package reads "
                                   f"({FORMAT_VERSION}): upgrade matryoshka-reranker")
        try:
            return cls(prompt=data["prompt"], query_max_len=data["query_max_len"],
                       passage_max_len=data["passage_max_len"])
        except KeyError as err:
            raise InputFormatError(f"{source}: missing {err.args[0]!r}") from None

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FORMAT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> InputFormat | None:
        """The format saved in ``folder``, or None when the folder carries none (a raw checkpoint)."""
        path = Path(folder) / FORMAT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputFormatError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, str(path))

    def describe_difference(self, other: InputFormat) -> str:
        return ", ".join(f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
                         for k in ("prompt", "query_max_len", "passage_max_len") if getattr(self, k) != getattr(other, k))

    def encoder(self, tokenizer) -> PairEncoder:
        return PairEncoder(tokenizer, self)


def resolve_format(folders: Sequence[str | os.PathLike], given: InputFormat | None = None) -> InputFormat:
    """The format a model made of ``folders`` (base, then adapters) was trained with.

    Every folder that carries a format must carry the same one; ``given`` (an explicit choice or
    the pipeline's params) must agree with it too. A raw checkpoint with no saved format scores
    with ``given`` or the defaults.
    """
    saved = [(Path(f), fmt) for f in folders if (fmt := InputFormat.load(f)) is not None]
    for folder, fmt in saved[1:]:
        if fmt != saved[0][1]:
            raise InputFormatError(f"{folder} was trained with a different input format than {saved[0][0]} "
                                   f"({fmt.describe_difference(saved[0][1])})")
    if saved and given is not None and given != saved[0][1]:
        raise InputFormatError(f"{saved[0][0]} was trained with a different input format than requested "
                               f"({saved[0][1].describe_difference(given)}); score it with the format it was "
                               "trained with, or retrain")
    if saved:
        return saved[0][1]
    return given or InputFormat()


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

    ``tokenizer`` is a transformers tokenizer or anything with the same call signature,
    ``bos_token_id``, ``pad_token_id`` and ``eos_token_id`` (see ``serving.tokenizer``). The
    query is cut to ``query_max_len`` tokens and the passage to ``passage_max_len`` and then to
    whatever room the query left in ``max_length``; the separator and prompt come on top, as in
    upstream's inference code (its training data code fits them inside the budget and caps the passage at
    ``passage_max_len + query_max_len // 2`` instead): one rule here, for training and inference alike.
    """

    def __init__(self, tokenizer, input_format: InputFormat | None = None):
        self.tokenizer = tokenizer
        self.format = input_format or InputFormat()
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.sep = self._ids("\n")
        self.prompt_ids = self.sep + self._ids(self.format.prompt)
        self.pad_token_id = _pad_id(tokenizer)

    @property
    def prompt(self) -> str:
        return self.format.prompt

    @property
    def max_length(self) -> int:
        return self.format.max_length

    @property
    def longest(self) -> int:
        """The most tokens one encoded pair can have (checked against the model's positions): the
        passage takes what the head (bos + query + separator) leaves of ``max_length``, then the prompt."""
        head = len(self.bos) + self.format.query_max_len + len(self.sep)
        return max(self.format.max_length, head) + len(self.prompt_ids)

    def _ids(self, text: str, limit: int | None = None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if limit is None else ids[:limit]

    def _ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def passage_room(self, head: int) -> int:
        """How many passage tokens a pair keeps after a head (bos + query + separator) of ``head`` tokens:
        ``passage_max_len``, less whatever the head took beyond the query's share of ``max_length``."""
        return min(self.format.passage_max_len, max(self.format.max_length - head, 0))

    def encode(self, query: str, passage: str) -> EncodedPair:
        return self.encode_many([(query, passage)])[0]

    def encode_many(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """``encode`` for many pairs, with one batched tokenizer call for the distinct queries and one
        for the passages: the Rust tokenizer runs a batch in parallel, and per-pair calls were what
        bounded GPU scoring (about 1,000 pairs/s on an H200 at every exit depth; README, GPU)."""
        for query, passage in pairs:
            if not isinstance(query, str) or not isinstance(passage, str):
                raise TypeError(
                    f"query and passage must be strings, got {type(query).__name__} and {type(passage).__name__}"
                )
        fmt = self.format
        queries = list(dict.fromkeys(query for query, _ in pairs))  # a ranking repeats one query
        heads = {query: self.bos + ids[: fmt.query_max_len] + self.sep
                 for query, ids in zip(queries, self._ids_many([QUERY_PREFIX + q for q in queries]))}
        bodies = self._ids_many([PASSAGE_PREFIX + passage for _, passage in pairs])
        encoded = []
        for (query, _), body in zip(pairs, bodies):
            head = heads[query]
            ids = head + body[: self.passage_room(len(head))] + self.prompt_ids
            encoded.append(EncodedPair(ids, len(head), len(self.prompt_ids)))
        return encoded

    def over_budget(self, query: str, texts: Sequence[str]) -> tuple[str, str] | None:
        """(field, why) for the first of ``query`` and ``texts[i]`` that ``encode_many`` would cut, else None: the
        check of a caller that refuses long input instead (the server's ``truncate: false``). A long query leaves
        a text less room (``passage_room``), exactly as encoding counts it."""
        query_ids = self._ids(QUERY_PREFIX + query)
        if len(query_ids) > self.format.query_max_len:
            return "query", f"longer than the model's {self.format.query_max_len}-token query budget"
        room = self.passage_room(len(self.bos) + len(query_ids) + len(self.sep))
        for i, ids in enumerate(self._ids_many([PASSAGE_PREFIX + text for text in texts])):
            if len(ids) > room:
                return f"texts[{i}]", (f"longer than the {room}-token passage budget this query leaves "
                                       f"(at most {self.format.passage_max_len})")
        return None

    def collate_numpy(self, pairs: Sequence[EncodedPair]) -> dict[str, np.ndarray]:
        """Right-pads a batch: input_ids and attention_mask (B, T); query/prompt lengths (B,); int64."""
        width = max(len(p.input_ids) for p in pairs)
        input_ids = np.full((len(pairs), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(pairs), width), dtype=np.int64)
        for row, pair in enumerate(pairs):
            input_ids[row, : len(pair.input_ids)] = pair.input_ids
            attention_mask[row, : len(pair.input_ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_lengths": np.array([p.query_length for p in pairs], dtype=np.int64),
            "prompt_lengths": np.array([p.prompt_length for p in pairs], dtype=np.int64),
        }

    def collate(self, pairs: Sequence[EncodedPair]) -> dict:
        """``collate_numpy`` as torch tensors (the PyTorch paths)."""
        import torch

        return {name: torch.from_numpy(array) for name, array in self.collate_numpy(pairs).items()}


def as_pair_list(pairs) -> tuple[list, bool]:
    """``compute_score``'s input as a list of pairs, and whether one bare pair was given.

    As in FlagEmbedding, a ``(query, passage)`` tuple or a 2-list of strings ``["q", "p"]`` is one pair.
    """
    single = isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
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
