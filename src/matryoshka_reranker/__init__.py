"""Matryoshka re-rankers: LLM cross-encoders whose exit depth and token width are chosen at run time."""

from .model.inputs import DEFAULT_PROMPT, PairEncoder  # torch-free at import time

__all__ = ["DEFAULT_PROMPT", "MatryoshkaModel", "MatryoshkaReranker", "OnnxReranker", "PairEncoder"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package (the CLI's start-up path) must not import torch/onnxruntime.
    if name == "MatryoshkaReranker":
        from .serving.reranker import MatryoshkaReranker

        return MatryoshkaReranker
    if name == "MatryoshkaModel":
        from .model.modeling import MatryoshkaModel

        return MatryoshkaModel
    if name == "OnnxReranker":
        from .serving.onnx_runtime import OnnxReranker

        return OnnxReranker
    raise AttributeError(name)
