"""The exported-model artifact format, in one place: names, ``index.json``, ``manifest.json``, verification.

An export folder (``paths.onnx``) holds one sub-folder per compression ratio and an ``index.json``::

    models/onnx/
      index.json                     {"format_version", "models": [{"name", "exit_layer", "ratio", "path",
                                      "model_file", ...}], "all_exits": [...]}
      ratio-1/
        exit-08.onnx ... exit-30.onnx  one graph per exit (decoder layers 1..k and head k)
        all-exits.onnx                 every exit's scores in one pass (evaluation)
        weights.bin                    the ratio's weights, once; every graph points into it
        tokenizer.json, tokenizer_config.json, ...
        README.md                      model card
        manifest.json                  what the folder is: its models, input format, sha256 of every file
      exit-08-ratio-1-int8/            a quantized copy: model.onnx + model.onnx.data (its own weights)
      exit-08-ratio-1-specialist/      an exit specialist: a ratio folder of its own (layers 1..8, own weights.bin)

Why one folder per ratio (format 3): the exits of a ratio share their weights, and ONNX's checker
(onnx >= 1.17) refuses external data that is hard-linked, a symlink, or outside the model's folder.
So the only layout in which every graph opens with standard tools (``onnx.load``,
``onnx.checker``, ``onnx.shape_inference``, ``onnxruntime.quantization``) *and* the weights are
stored once is all exit graphs beside one regular weights file. A download of any exit of a
ratio is that ratio's folder (about one full model: a shallow exit reads only its layers).

A configuration's name is ``exit-08-ratio-1`` (``-int8`` etc. for a quantized variant, ``-specialist``
for an exit specialist: its own folder, since its layers 1..k have their own weights): the same
string names the metrics key, the DVC artifact and the release record entry; ``path`` +
``model_file`` locate its graph.

A folder is trusted only if its manifest is from a known format version, every file it lists has
the recorded sha256, and it holds no file the manifest does not list (a dropped-in
``special_tokens_map.json`` would change the tokenizer). This module imports neither torch nor
onnx: export, ONNX serving, evaluation, the gate and the release code all read it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import sha256_file
from ..core.errors import CheckFailed, InputError
from ..model.inputs import InputFormat

FORMAT_VERSION = 3  # 2: names exit-KK-ratio-R, input_format in the manifest, strict file lists; 3: a folder per ratio
MANIFEST = "manifest.json"
INDEX = "index.json"
MODEL_FILE = "model.onnx"  # the one graph of a quantized copy
ALL_EXITS_FILE = "all-exits.onnx"
WEIGHTS_FILE = "weights.bin"
MODEL_CARD = "README.md"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's weights file; its sha256 is in ``adapters``
SPECIALIST = "specialist"  # the variant of an exit specialist (training/specialist.py); released and served
SCORES = "scores"
TOKEN_INPUTS = ["input_ids", "attention_mask"]
LENGTH_INPUTS = ["query_lengths", "prompt_lengths"]
NAME_RE = re.compile(r"^exit-(\d+)-ratio-(\d+)(?:-([a-z0-9]+(?:-[a-z0-9]+)*))?$")  # variant: int8, int8-token, ...


class ModelIntegrityError(CheckFailed):
    """A model folder does not match its manifest (missing, newer format, changed or extra files)."""


class ArtifactFormatError(InputError):
    """An index or manifest is malformed (not a file this package wrote)."""


class ExitNotExported(InputError, LookupError):
    """A folder was asked for an exit it does not hold (bad input, not a damaged model)."""


def config_name(exit_layer: int, ratio: int, variant: str | None = None) -> str:
    """``exit-08-ratio-1`` (``exit-08-ratio-1-int8`` for a variant): folder, metrics key and DVC artifact name."""
    return f"exit-{exit_layer:02d}-ratio-{ratio}" + (f"-{variant}" if variant else "")


def ratio_folder(ratio: int) -> str:
    """``ratio-1``: the folder holding every exit of a ratio (and its one weights file)."""
    return f"ratio-{ratio}"


def exit_model_file(exit_layer: int) -> str:
    """``exit-08.onnx``: exit k's graph inside its ratio folder."""
    return f"exit-{exit_layer:02d}.onnx"


def parse_config_name(name: str) -> tuple[int, int, str | None]:
    match = NAME_RE.match(name)
    if not match:
        raise ArtifactFormatError(f"{name!r} is not a configuration name (exit-KK-ratio-R[-variant])")
    return int(match.group(1)), int(match.group(2)), match.group(3)


@dataclass(frozen=True)
class ExportedConfig:
    """One exported model as ``index.json`` lists it, with its folder resolved."""

    name: str
    exit_layer: int
    ratio: int
    compress_layers: tuple[int, ...]
    path: Path  # the folder (its ratio's, or a quantized copy's own)
    model_file: str  # the graph inside it
    variant: str | None = None  # None = the shared-weight float model; "int8" etc. = a quantized copy; "specialist"

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file

    def to_index_entry(self, root: Path) -> dict:
        return {"name": self.name, "exit_layer": self.exit_layer, "ratio": self.ratio,
                "compress_layers": list(self.compress_layers), "variant": self.variant,
                "path": self.path.relative_to(root).as_posix(), "model_file": self.model_file}


def write_index(folder: Path, configs: list[ExportedConfig], extra: dict | None = None) -> dict:
    from ..core.atomic import write_json

    index = {"format_version": FORMAT_VERSION, **(extra or {}),
             "models": [c.to_index_entry(folder) for c in configs]}
    write_json(folder / INDEX, index)
    return index


def read_index(folder: str | os.PathLike) -> list[ExportedConfig]:
    """The models ``index.json`` lists, sorted by (variant, ratio, exit layer)."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the export stage first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        _check_version(index.get("format_version"), path)
        configs = [ExportedConfig(name=str(m["name"]), exit_layer=int(m["exit_layer"]), ratio=int(m["ratio"]),
                                  compress_layers=tuple(int(c) for c in m.get("compress_layers") or ()),
                                  path=folder / m["path"], model_file=str(m["model_file"]), variant=m.get("variant"))
                   for m in index["models"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ArtifactFormatError(f"{path}: not a valid export index ({err})") from None
    if not configs:
        raise ArtifactFormatError(f"{path}: lists no models")
    if len({c.name for c in configs}) != len(configs):
        raise ArtifactFormatError(f"{path}: model names repeat")
    for config in configs:
        if _outside(folder, config.path) or _outside(config.path, config.model_path):
            raise ArtifactFormatError(f"{path}: model {config.model_path} is outside {folder}")
    return sorted(configs, key=lambda c: (c.variant or "", c.ratio, c.exit_layer))


def read_index_extra(folder: str | os.PathLike) -> dict:
    """``index.json`` as a dict (for fields beyond the model list, e.g. calibration)."""
    return json.loads((Path(folder) / INDEX).read_text(encoding="utf-8"))


def _check_version(version, path) -> None:
    if not isinstance(version, int) or version < 1:
        raise ModelIntegrityError(f"{path}: missing or invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelIntegrityError(f"{path} has format_version {version}; this matryoshka-reranker reads up to "
                                  f"{FORMAT_VERSION}: upgrade the package")
    if version < FORMAT_VERSION:
        raise ModelIntegrityError(f"{path} has format_version {version}, from an older matryoshka-reranker; "
                                  "export it again")


def _outside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return True
    return False


def folder_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` except the manifest."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


# ------------------------------------------------------------------------------------ manifests
def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """The folder's manifest, after checking its format version and (``verify``) every file.

    Verification refuses files listed but missing, files whose sha256 differs, and files present
    but not listed.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelIntegrityError(f"{folder} has no {MANIFEST}: not an exported Matryoshka model folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelIntegrityError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ModelIntegrityError(f"{path}: expected a JSON object")
    _check_version(manifest.get("format_version"), path)
    files, models = manifest.get("files"), manifest.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ModelIntegrityError(f"{path}: 'models' must list the folder's models")
    if not isinstance(files, dict) or any(m.get("model_file") not in files for m in models):
        raise ModelIntegrityError(f"{path}: 'files' must list every file, including each model file")
    if verify:
        verify_files(folder, files)
    return manifest


def model_view(manifest: dict, exit_layer: int | None = None, all_exits: bool = False) -> dict:
    """One model of a folder's manifest: the folder's fields with that model's over them.

    ``all_exits``: the ratio's every-exit graph; else exit ``exit_layer`` (``None``: the deepest
    exit model in the folder). What ``OnnxReranker``, the server, the model card and evaluation read.
    """
    kind = "all_exits" if all_exits else "exit"
    models = [m for m in manifest["models"] if m.get("kind", "exit") == kind]
    if exit_layer is not None and not all_exits:
        models = [m for m in models if m.get("exit_layer") == exit_layer]
    if not models:
        have = sorted(m.get("exit_layer") for m in manifest["models"] if m.get("kind", "exit") == "exit")
        wanted = "an all-exits model" if all_exits else f"exit layer {exit_layer}"
        raise ExitNotExported(f"{manifest.get('name', '?')}: no {wanted} in this folder; its exits: {have}")
    model = max(models, key=lambda m: m.get("exit_layer", 0))
    shared = {k: v for k, v in manifest.items() if k != "models"}
    compression = {**shared.get("compression", {}), "applied_layers": model.get("applied_layers", [])}
    return {**shared, **model, "compression": compression}


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Every listed file present with its sha256, and nothing else in the folder (manifest aside)."""
    problems = []
    for name, expected in sorted(files.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name!r} is outside the folder")
        elif not path.is_file():
            problems.append(f"{name} is listed but missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 {sha256_file(path)[:12]}... does not match the manifest "
                            f"({str(expected)[:12]}...): corrupted, truncated or changed after export")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    problems += [f"{name} is not listed in the manifest (a file added after export)"
                 for name in sorted(present - set(files))]
    if problems:
        raise ModelIntegrityError(f"{folder} does not match its {MANIFEST}: " + "; ".join(problems))


def adapter_sha256(path: str | os.PathLike) -> str | None:
    """A manifest's ``adapters[].sha256``: sha256 of a LoRA folder's ``adapter_model.safetensors`` (None
    without one). Written at export and compared by ``serving.server.export_calibrations``."""
    weights = Path(path) / ADAPTER_WEIGHTS
    return sha256_file(weights) if weights.is_file() else None


def config_manifest(config: ExportedConfig, verify: bool = False) -> dict:
    """``model_view`` of an index entry's model (its folder's manifest, read and optionally verified)."""
    manifest = read_manifest(config.path, verify=verify)
    matches = [m for m in manifest["models"] if m.get("model_file") == config.model_file]
    if not matches:
        raise ModelIntegrityError(f"{config.path}/{MANIFEST} lists no model {config.model_file}")
    return model_view(manifest, matches[0].get("exit_layer"), all_exits=matches[0].get("kind") == "all_exits")


def manifest_input_format(manifest: dict) -> InputFormat:
    try:
        return InputFormat.from_dict(manifest["input_format"], f"{manifest.get('name', '?')}/{MANIFEST}")
    except KeyError:
        raise ModelIntegrityError(f"{manifest.get('name', '?')}/{MANIFEST}: no input_format") from None


def calibrated_probability(calibration: dict | None, scores):
    """``sigmoid(a * score + b)`` with the config's Platt (a, b) (a plain sigmoid without one)."""
    import numpy as np

    a, b = (calibration or {}).get("a", 1.0), (calibration or {}).get("b", 0.0)
    z = a * np.asarray(scores, dtype=np.float64) + b
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + exp(-z)), without overflowing for z << 0
