"""A torch- and transformers-free tokenizer for serving exported models.

An export folder carries HF's ``tokenizer.json`` and the special-token ids in its manifest; this
wrapper gives ``PairEncoder`` the call signature of a transformers tokenizer
(``tok(text, add_special_tokens=False)["input_ids"]``) on top of the ``tokenizers`` library, so a
serving box needs only onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

from pathlib import Path


class ServingTokenizer:
    def __init__(self, tokenizer_file: str | Path, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, list]:
        if isinstance(text, list):  # a batch: encoded in parallel by the Rust library
            encodings = self._tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
            return {"input_ids": [encoding.ids for encoding in encodings]}
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    @classmethod
    def from_manifest(cls, folder: Path, manifest: dict) -> ServingTokenizer:
        spec = manifest["tokenizer"]
        return cls(folder / spec["file"], spec.get("bos_token_id"), spec.get("eos_token_id"), spec.get("pad_token_id"))


def special_token_ids(tokenizer) -> dict:
    """What the manifest records of a transformers tokenizer (export side)."""
    return {"file": "tokenizer.json", "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
