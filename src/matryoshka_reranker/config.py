"""``params.yaml``, the one source of configuration, parsed into typed models.

Every section forbids unknown keys, so a typo fails before any work with a message naming the key.
``load_params(path, overrides)`` applies ``-S dotted.key=value`` overrides (values parsed as YAML).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .core.errors import InputError
from .model.inputs import InputFormat

_FORMAT = InputFormat()  # the defaults of the input-format fields below


def _scalar_kinds(annotation) -> set:
    """The plain types a field accepts, looking through Optional / Annotated / Union."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


TOKEN_ADAPTER_PREFIX = "token-ratio-"  # paths.compensation/token-ratio-<r>: one width's token adapter

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixups(cls, value, info):
        """``true`` is not a layer count and ``1`` is not a switch: pydantic's lax mode would take both
        (``-S model.start_layer=true`` trained from layer 1), so a typo in a value fails like one in a key."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if bool in kinds and not kinds & {int, float, str} and value is not None and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        default = cls.model_fields[info.field_name].default
        if isinstance(value, dict) and isinstance(default, Section):
            # a sub-section given in part keeps what its default sets (compensation.token's same_layer_mse,
            # specialist.lora's rank 64), not the generic class defaults: `token: {max_steps: 1200}` must not
            # silently switch the adapter's objective
            return {**default.model_dump(exclude_unset=True), **value}
        return value


class DataParams(Section):
    """BEIR-style input data and the subsets the default pipeline uses."""

    beir_dir: str = "data/scifact"  # corpus.jsonl(.gz), queries.jsonl(.gz), qrels/{split}.tsv
    train_split: str = "train"
    eval_split: str = "test"
    train_queries: int = Field(64, ge=0)  # 0 = every query of the split
    negatives_per_query: int = Field(7, ge=1)  # BM25-mined, judged documents skipped
    eval_queries: int = Field(16, ge=0)  # 0 = every query of the split
    eval_candidates: int = Field(16, ge=1)  # BM25 top-k re-ranked per eval query
    seed: int = 42
    train_file: str | None = None  # bring your own FlagEmbedding-format JSONL instead of BEIR mining


class ModelParams(Section):
    name_or_path: str = "embedded:smollm2-135m-instruct"  # a folder, or an embedded default
    start_layer: int = Field(4, ge=1)
    layer_sep: int = Field(1, ge=1)
    prompt: str = Field(_FORMAT.prompt, min_length=1)
    query_max_len: int = Field(_FORMAT.query_max_len, ge=4)
    passage_max_len: int = Field(_FORMAT.passage_max_len, ge=4)
    # auto: bf16 on CUDA, fp32 on CPU for training and the pipeline's measurements; MatryoshkaReranker /
    # from_pipeline scoring with auto also picks bf16 on CPUs with AMX-BF16 (core.hardware)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def torch_dtype(self):
        """The dtype every stage trains and measures in (``core.hardware.pick_dtype`` on this machine's
        device). Pipeline measurements stay fp32 on every CPU, so they do not depend on whether it has
        AMX; ``MatryoshkaReranker``'s own default ("auto" for scoring) may pick bf16 there."""
        from .core.hardware import pick_device, pick_dtype

        return pick_dtype(self.dtype, pick_device())

    @property
    def input_format(self) -> InputFormat:
        """The one input format of this pipeline; saved with every adapter and export."""
        return InputFormat(self.prompt, self.query_max_len, self.passage_max_len)

    @property
    def max_length(self) -> int:
        return self.input_format.max_length


class TeacherParams(Section):
    kind: Literal["bi_encoder", "cross_encoder", "matryoshka", "hybrid"] = "bi_encoder"
    name_or_path: str = "embedded:all-minilm-l6-v2"
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    shard_size: int = Field(64, ge=1)  # training lines per resumable shard
    score_scale: float | None = Field(None, gt=0)  # scores x this; null: 20 bi_encoder, 10 hybrid, else 1
    hybrid_weight: float = Field(0.5, ge=0, le=1)  # hybrid: weight of BM25 vs the neural score (min-max per line)
    # hybrid: the neural half, a bi-encoder (name_or_path) or a Matryoshka re-ranker (name_or_path + adapters)
    hybrid_neural: Literal["bi_encoder", "matryoshka"] = "bi_encoder"
    # Matryoshka teacher: LoRA folders merged in order onto name_or_path (e.g. a trained run's
    # models/self_distill, models/compensation/layer): a second round distils from the first's model
    adapters: list[str] = []
    exit_layer: int | None = Field(None, ge=1)  # Matryoshka teacher: score at this exit (null: deepest)

    @property
    def neural(self) -> str:
        """The neural model that scores: the kind itself, or hybrid's neural half."""
        return self.hybrid_neural if self.kind == "hybrid" else self.kind

    @model_validator(mode="after")
    def _matryoshka_only(self) -> TeacherParams:
        if self.kind != "hybrid" and self.hybrid_neural != "bi_encoder":
            raise ValueError(f"teacher.hybrid_neural {self.hybrid_neural!r} is for teacher.kind hybrid, not {self.kind!r}")
        if self.neural != "matryoshka" and (self.adapters or self.exit_layer is not None):
            raise ValueError(f"teacher.adapters / teacher.exit_layer are for a Matryoshka teacher (teacher.kind "
                             f"matryoshka, or hybrid with hybrid_neural matryoshka), not {self.kind!r}"
                             + (f" with hybrid_neural {self.hybrid_neural!r}" if self.kind == "hybrid" else ""))
        return self


class CompressionParams(Section):
    """What training samples per step: each layer on/off, one ratio (1 = no compression)."""

    layers: list[int] = [8]
    ratios: list[int] = [1, 2, 4]

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError("ratios must be a non-empty list of integers >= 1")
        return value


class LoraParams(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # masks cost ~20% of a CPU step
    target_modules: list[str] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "score_heads",
    ]
    heads: Literal["full", "lora"] = "full"  # score heads trained as full weights, or LoRA like the rest
    # {k: r}: decoder layers 1..k get rank r (alpha scaled with it, so alpha/rank stays), e.g. {8: 64}
    # gives the layers every shallow exit depends on more capacity; the smallest k covering a layer wins
    layer_ranks: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = {}


class TrainParams(Section):
    """Hyper-parameters of one training run (self-distillation or one compensation adapter)."""

    train_method: str = "distill_fix_layer_teacher"
    fix_layer_every: int = Field(8, ge=1)  # `fix_layer`: refresh the teacher every k exit layers
    train_group_size: int = Field(4, ge=2)
    per_device_batch_size: int = Field(1, ge=1)  # groups per device per step
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(12, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)  # softmax temperature of teacher distributions
    # loss weight per exit layer, e.g. {8: 8.0}; exits not named weigh 1 (checked against the model)
    layer_weights: dict[int, Annotated[float, Field(ge=0)]] = {}
    save_steps: int = Field(6, ge=1)
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    deepspeed: str | None = "configs/deepspeed/zero1.json"  # null: plain Trainer
    # bf16 mixed precision for a fp32 model (CPU): weights, optimizer state and score heads stay fp32, the
    # forward/backward run under torch.autocast(bfloat16) (DeepSpeed's `torch_autocast`, or the Trainer's
    # bf16 without DeepSpeed), the probe's forward passes too. On CPUs with AMX-BF16 a step is ~1.4x faster
    # (benchmarks/bench_train_dtype.py); on CPUs without AMX it is slower. No effect on a bf16 model (GPU).
    bf16_autocast: bool = False
    lora: LoraParams = LoraParams()
    seed: int = 42
    # keep: heads as the model has them ("Yes" row of a raw LM; trained heads of a merged model);
    # probe: fit every exit's head on frozen last-token states first (training/heads.py)
    head_init: Literal["keep", "probe"] = "keep"
    probe_queries: int = Field(256, ge=0)  # training groups the probe reads (0 = all)
    probe_l2: float = Field(0.01, ge=0)  # L2 penalty of the probe (standardised features)
    snapshot_steps: list[int] = []  # save the adapter at these steps too (learning curve)

    @field_validator("train_method")
    @classmethod
    def _method(cls, value: str) -> str:
        known = ("normal", "distill", "teacher", "same_layer", "final_layer", "last_layer", "fix_layer")
        if not any(flag in value for flag in known):
            raise ValueError(f"train_method {value!r} names none of {known}")
        if "mse" in value and "same_layer" not in value:  # model/losses.py: mse matches a self target's raw scores
            raise ValueError(f"train_method {value!r}: mse is for same_layer (the same exit's head, the same scale); "
                             f"other self targets are other heads' scores, and without one mse does nothing")
        return value

    @model_validator(mode="after")
    def _probe_heads_are_saved(self) -> TrainParams:
        if self.head_init == "probe" and self.lora.heads != "full":
            raise ValueError("head_init probe needs lora.heads full: the probe sets the base model's heads, and a LoRA "
                             "on them saves only its update, so the adapter would score with the unfitted heads")
        return self


class CompensationParams(Section):
    """Factorized compensation, trained on the merged self-distilled weights."""

    layer: TrainParams = TrainParams(train_method="distill_last_layer", max_steps=4, save_steps=2)
    token: TrainParams = TrainParams(train_method="same_layer_mse", max_steps=4, save_steps=2)
    token_ratios: list[int] = [2, 4]  # one horizontal adapter per ratio, at compression.layers

    @field_validator("token_ratios")
    @classmethod
    def _token_ratios(cls, value: list[int]) -> list[int]:
        if any(r < 2 for r in value):
            raise ValueError("token_ratios must be integers >= 2 (ratio 1 needs no token adapter)")
        return value


class SpecialistParams(TrainParams):
    """Exit specialists (``training/specialist.py``): the ratio-1 model cut after exit k and trained for
    exit k alone on the deepest exit's scores. Each ships as ``exit-KK-ratio-1-specialist`` beside the
    shared-weight exits. Why: on SciFact an exit-8 specialist came within 0.05 nDCG@10 of full depth at
    95% where no shared-weight recipe did (docs/quality.md, "Exit 8's gap"). The training settings are a ``TrainParams``; the stage
    sets ``layer_weights`` itself (exit k only), and a group is the positive + ``train_group_size - 1``
    of the query's negatives, in file order (the hardest BM25 negatives first)."""

    exits: list[int] = []  # e.g. [8]; empty: the stage writes only specialists.json ({"exits": []}), the export adds nothing
    train_method: str = "teacher"  # listwise CE + soft CE to the deepest exit's scores
    train_group_size: int = Field(8, ge=2)
    max_steps: int = Field(1600, ge=1)
    save_steps: int = Field(400, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    lora: LoraParams = LoraParams(rank=64, alpha=128)


class DistributedParams(Section):
    """How many worker processes the training stages run (data parallel, one per GPU)."""

    # auto: one per visible CUDA device, 1 without CUDA. Above 1, `matryoshka self-distill` /
    # `compensate` start themselves under torch.distributed.run unless a launcher already did.
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"


KEEP_PART = r"^(score_heads|first_layer|(down_proj|all_mlp|all)(@[1-9][0-9]*(-[1-9][0-9]*)?)?)$"


FLOAT32_ONLY_QUANTIZE = ("int8", "int8-token")  # schemes that rewrite float32 graphs (not float16 exports)


class ExportParams(Section):
    exit_layers: list[int] = [8, 16, 24, 30]
    ratios: list[int] = [1, 2, 4]
    compress_layers: list[int] = [8]
    opset: int = Field(18, ge=18)
    dtype: Literal["float32", "float16"] = "float32"
    dynamo: bool = True  # torch.onnx's dynamo exporter; False: TorchScript exporter (documented fallback)
    parity_tolerance: float = Field(1e-4, gt=0)  # max |ORT - PyTorch| on the validation batch (fp32)
    fp16_tolerance: float = Field(5e-2, gt=0)  # dtype float16: max |ORT fp16 - PyTorch fp32| (see export.py)
    attn_implementation: Literal["eager", "sdpa"] = "eager"  # attention in the exported graph (bench_onnx.py)
    share_weights: bool = True  # one weights.bin per ratio folder, read by every exit's graph; false: a file per graph
    calibration_queries: int = Field(8, ge=0)  # eval queries (calibration half) for Platt scaling; 0 = none
    # quantized copies of every config (exit-KK-ratio-R-<scheme>), evaluated and gated like the others
    quantize: list[Literal["int8", "int8-token", "int8-weight-only", "int4"]] = []
    # MatMuls left in fp32 besides the score heads (always kept); null: the scheme's default (int8: down_proj;
    # int8-token: first_layer; others: nothing more);
    # a part may name decoder layers: down_proj@25-30, all@1 (= first_layer)
    quantize_keep_fp32: list[Annotated[str, Field(pattern=KEEP_PART)]] | None = None

    @field_validator("quantize_keep_fp32")
    @classmethod
    def _layer_ranges(cls, value: list[str] | None) -> list[str] | None:
        for part in value or []:
            first, _, last = part.partition("@")[2].partition("-")
            if last and int(last) < int(first):
                raise ValueError(f"{part!r}: layers @a-b need a <= b")
        return value
    # SmoothQuant alpha for int8 / int8-token (0 = off): activation outlier channels moved into the
    # weights, from per-channel maxima over training pairs (below; docs/export.md)
    quantize_smoothing: float = Field(0.75, ge=0, le=1)
    # training pairs (the prepared groups' query with its first positive and negatives, at most 4 per query)
    # whose activations set those maxima: never eval queries, which the quantized configs are evaluated on
    quantize_calibration_pairs: int = Field(128, ge=16)

    @model_validator(mode="after")
    def _quantize_needs_float32(self) -> ExportParams:
        float32_only = [s for s in self.quantize if s in FLOAT32_ONLY_QUANTIZE]
        if self.dtype == "float16" and float32_only:  # else found only when ONNX Runtime loads the copy, at the end
            raise ValueError(f"quantize {float32_only} rewrites float32 graphs: use dtype float32, or int8-weight-only "
                             "/ int4 with float16")
        return self


class ValidationParams(Section):
    """Bounds of the Great Expectations suite over training data (lengths in characters)."""

    min_rows: int = Field(1, ge=0)
    min_query_chars: int = Field(3, ge=0)
    max_query_chars: int = Field(1000, ge=1)
    min_passage_chars: int = Field(10, ge=0)
    max_passage_chars: int = Field(20000, ge=1)
    max_duplicate_fraction: float = Field(0.01, ge=0, le=1)  # lines repeating an earlier (query, pos)
    sample_rows: int = Field(5, ge=1, le=100)  # failing lines quoted per check in the report

    @model_validator(mode="after")
    def _bounds(self) -> ValidationParams:
        for name in ("query", "passage"):
            low, high = getattr(self, f"min_{name}_chars"), getattr(self, f"max_{name}_chars")
            if low > high:
                raise ValueError(f"min_{name}_chars ({low}) > max_{name}_chars ({high})")
        return self


class EvaluationParams(Section):
    batch_size: int = Field(16, ge=1)
    measures: list[str] = Field(["nDCG@10", "RR@10", "R@10"], min_length=1)  # the first is the headline
    confidence: float = Field(0.95, gt=0, lt=1)  # bootstrap intervals over queries
    bootstrap_resamples: int = Field(10_000, ge=100)
    latency_queries: int = Field(3, ge=1)  # queries each exported model is timed on (one call per query)
    untrained_baseline: bool = False  # baselines stage: score the untrained model too (one more full pass)
    learning_curve: bool = False  # learning_curve stage: score every self-distillation snapshot (a pass each)
    effects: bool = False  # effects stage: compensation before/after (one PyTorch pass per exported ratio)
    # Compare ONNX Runtime with PyTorch: true = every exported exit at the largest exported ratio
    # (one PyTorch forward gives all exits); a config name (exit-30-ratio-4) = that one; false = off.
    pytorch_check: bool | str = True
    pytorch_check_queries: int = Field(3, ge=0)  # eval queries the check scores (0 = all)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads (0 = its default)

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, measures: list[str]) -> list[str]:
        """Each name must parse as an ir-measures measure (a typo fails here, not after the export)."""
        import ir_measures

        for name in measures:
            try:
                ir_measures.parse_measure(name)
            except Exception as err:  # noqa: BLE001 - ir_measures raises several kinds
                raise ValueError(f"{name!r} is not an ir-measures measure (e.g. nDCG@10, RR@10, R@10): {err}") from None
        return measures


class GateParams(Section):
    """Allowed drop per exit layer x ratio x measure versus the last release.

    A drop within either bound passes (allowed = max(abs, rel * old)); null turns a bound off;
    with both off any drop is judged by the test alone. A larger drop fails only when a paired
    permutation test over the eval queries finds it significant at ``alpha`` (release/gate.py).
    """

    max_drop_abs: float | None = Field(0.02, ge=0)
    max_drop_rel: float | None = Field(0.05, ge=0)  # fraction of the old value
    alpha: float = Field(0.05, gt=0, le=1)  # significance level of the paired test


class ReleaseParams(Section):
    remote_name: str = "releases"
    remote_url: str = "../matryoshka-releases"  # a local folder by default; s3://, gs://, ssh:// work too
    version_scheme: Literal["date", "semver"] = "date"  # vYYYY.MMDD.N or vMAJOR.MINOR.PATCH (see versions.py)
    git_remote: str | None = None  # push the release commit + tags here (e.g. origin); null: local tags only


class PathParams(Section):
    """Where stages write. dvc.yaml reads the same values, so they are set once, here."""

    train_groups: str = "derived/train_groups.jsonl"
    eval_candidates: str = "derived/eval_candidates.jsonl"
    validation_report: str = "reports/validation"
    teacher_scored: str = "derived/train_scored.jsonl"
    teacher_shards: str = "derived/teacher_shards"  # resumable shards (DVC `persist`)
    self_distill: str = "models/self_distill"  # LoRA adapter folder (incl. score heads)
    compensation: str = "models/compensation"  # layer/ and token-ratio-<r>/ adapter folders
    specialists: str = "models/specialists"  # exit-<KK>/ adapter folders + specialists.json
    checkpoints: str = "checkpoints"  # Trainer checkpoints for resume (DVC `persist`)
    onnx: str = "models/onnx"
    metrics: str = "metrics/per_layer.json"
    per_query: str = "metrics/per_query.json"  # every system's value per query (the gate's paired test)
    summary: str = "metrics/summary.json"  # flat headline numbers for `dvc exp show`
    baselines: str = "metrics/baselines.json"  # the untrained model on the eval set (baselines stage)
    learning_curve: str = "metrics/learning_curve.json"  # quality per self-distillation snapshot (+ .png)
    effects: str = "metrics/effects.json"  # compensation drop before/after per exit x ratio
    plots: str = "metrics/plots"
    gate_report: str = "reports/gate"


class Params(Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    teacher: TeacherParams = TeacherParams()
    compression: CompressionParams = CompressionParams()
    self_distill: TrainParams = TrainParams()
    compensation: CompensationParams = CompensationParams()
    specialist: SpecialistParams = SpecialistParams()
    distributed: DistributedParams = DistributedParams()
    export: ExportParams = ExportParams()
    validation: ValidationParams = ValidationParams()
    evaluation: EvaluationParams = EvaluationParams()
    gate: GateParams = GateParams()
    release: ReleaseParams = ReleaseParams()
    paths: PathParams = PathParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        """Settings that must agree, checked before any work (each error names both keys)."""
        exits = set(range(self.model.start_layer, 10_000, self.model.layer_sep))
        bad = [k for k in self.export.exit_layers if k not in exits]
        if bad:
            raise ValueError(
                f"export.exit_layers {bad} have no score head with model.start_layer="
                f"{self.model.start_layer}, model.layer_sep={self.model.layer_sep}"
            )
        if "same_layer" in self.self_distill.train_method:
            raise ValueError(f"self_distill.train_method {self.self_distill.train_method!r}: same_layer teaches each exit "
                             "the model without the adapter being trained, i.e. the untrained LM in "
                             "self-distillation; it is meant for compensation.token.train_method")
        if "same_layer" in self.compensation.layer.train_method:
            raise ValueError("compensation.layer.train_method: same_layer is for the token adapters; the layer "
                             "adapter trains at full width, where its reference is the model it starts from")
        if "same_layer" in self.compensation.token.train_method and self.compensation.token.head_init == "probe":
            raise ValueError("compensation.token: same_layer with head_init probe would refit the heads the "
                             "reference pass uses; use head_init keep")
        comp, export = self.compression, self.export
        token, exported = self.compensation.token_ratios, [r for r in self.export.ratios if r > 1]
        missing = [r for r in exported if r not in token]
        if missing:
            raise ValueError(f"export.ratios {missing} have no token adapter: add them to compensation.token_ratios "
                             f"(now {token})")
        unsampled = [r for r in token if r not in comp.ratios]
        if unsampled:
            raise ValueError(f"compensation.token_ratios {unsampled} are not in compression.ratios {comp.ratios}: "
                             "self-distillation never trains at that width, so its adapter would compensate a "
                             "model that never saw it; add the ratio to compression.ratios")
        if token and not comp.layers:
            raise ValueError(f"compensation.token_ratios {token} need compression.layers (where tokens are merged)")
        if self.evaluation.effects and 1 not in export.ratios:
            raise ValueError(f"evaluation.effects measures each ratio's drop against ratio 1: add 1 to export.ratios "
                             f"(now {export.ratios}) or turn effects off")
        if exported and sorted(set(export.compress_layers)) != sorted(set(comp.layers)):
            raise ValueError(f"export.compress_layers {export.compress_layers} differ from compression.layers "
                             f"{comp.layers}: the token adapters of export.ratios {exported} were trained merging "
                             "tokens at compression.layers, so the export must compress there too")
        spec = self.specialist
        if spec.exits:
            if 1 not in export.ratios:
                raise ValueError(f"specialist.exits {spec.exits}: a specialist is cut from the ratio-1 model; add 1 to "
                                 f"export.ratios (now {export.ratios})")
            bad = sorted(k for k in spec.exits if k not in export.exit_layers)
            if bad:
                raise ValueError(f"specialist.exits {bad} are not in export.exit_layers {export.exit_layers}: a "
                                 "specialist ships beside its exit's shared-weight model")
            if spec.layer_weights:
                raise ValueError("specialist.layer_weights: the stage trains exit k alone (weight 1 at k, 0 "
                                 "elsewhere); leave it empty")
            own = [flag for flag in ("same_layer", "final_layer", "last_layer", "fix_layer") if flag in spec.train_method]
            if own:
                raise ValueError(f"specialist.train_method {spec.train_method!r}: {own[0]} would teach exit k from the "
                                 "cut model's own exits (exit k is its deepest); use teacher (the full model's "
                                 "deepest exit, the default) or normal")
            deep = sorted(r for r in spec.lora.layer_ranks if r > min(spec.exits))
            if deep:
                raise ValueError(f"specialist.lora.layer_ranks {deep}: a specialist at exit {min(spec.exits)} has "
                                 f"{min(spec.exits)} layers")
        return self

    def adapter_stack(self, ratio: int) -> list[Path]:
        """Adapters for one width, in merge order: self-distillation, layer (vertical), token (ratio)."""
        stack = [Path(self.paths.self_distill), self.layer_adapter_dir()]
        return stack + [self.token_adapter_dir(ratio)] if ratio > 1 else stack

    def layer_adapter_dir(self) -> Path:
        """The vertical (depth) compensation adapter."""
        return Path(self.paths.compensation) / "layer"

    def token_adapter_dir(self, ratio: int) -> Path:
        """The horizontal (width) compensation adapter for ``ratio``: ``token-ratio-<r>``, also its name in
        ``compensate --only``."""
        return Path(self.paths.compensation) / f"{TOKEN_ADAPTER_PREFIX}{ratio}"

    def specialist_dir(self, exit_layer: int) -> Path:
        """The exit-k specialist's adapter, trained on ``adapter_stack(1)`` cut after layer k."""
        return Path(self.paths.specialists) / f"exit-{exit_layer:02d}"

    def depth_problems(self, num_layers: int, exits: list[int]) -> list[str]:
        """The settings that must fit the model's depth (``num_layers``; score heads at ``exits``), each problem
        naming its key. Checked from the model folder's config.json by ``prepare``, before any data work, and
        again when training loads the model (``training.trainer.check_against_model``)."""
        n, problems = num_layers, []
        missing = [k for k in self.export.exit_layers if k not in exits]
        if missing:
            problems.append(f"export.exit_layers {missing}: the model has {n} layers, score heads at "
                            f"{exits[0]}..{exits[-1]}" + (f" every {exits[1] - exits[0]}" if len(exits) > 1 else ""))
        deepest = [k for k in self.specialist.exits if k >= n]
        if deepest:
            problems.append(f"specialist.exits {deepest}: a specialist learns from the deepest exit ({n}), so it must "
                            "sit below it")
        for key, layers in (("compression.layers", self.compression.layers),
                            ("export.compress_layers", self.export.compress_layers)):
            outside = [c for c in layers if not 1 <= c < n]
            if outside:
                problems.append(f"{key} {outside} outside [1, {n - 1}] (the model has {n} layers)")
        for key, train in (("self_distill", self.self_distill), ("compensation.layer", self.compensation.layer),
                           ("compensation.token", self.compensation.token)):
            unknown = sorted(set(train.layer_weights) - set(exits))
            if unknown:
                problems.append(f"{key}.layer_weights {unknown}: no exit there (exits {exits})")
            deep = sorted(k for k in train.lora.layer_ranks if k > n)
            if deep:
                problems.append(f"{key}.lora.layer_ranks {deep}: the model has {n} layers")
        return problems

    def fingerprint(self) -> str:
        """sha256 of the canonical params, recorded in manifests."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class ParamsError(InputError):
    """A params file or override is invalid; the message names the key."""


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if path.is_file():
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{path}: not valid YAML: {err}") from err
        except UnicodeDecodeError as err:
            raise ParamsError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    elif path.exists():
        raise ParamsError(f"{path}: is not a file (give the params file, e.g. params.yaml)")
    else:
        raise ParamsError(f"{path}: no such params file")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    for override in overrides or []:
        apply_override(raw, override)
    return parse_params(raw, source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys: a second ``data:`` section would silently
    replace the first (every key it lacks back at its default). A repeated key is an error here."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # YAML merge keys (<<) may override; unhashable keys fail in construct_mapping
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ParamsError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """``a.b.c=value`` into a nested dict; the value is parsed as YAML (so ``[8, 16]`` is a list)."""
    if "=" not in override:
        raise ParamsError(f"override {override!r} must look like dotted.key=value")
    key, _, value = override.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {key!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {key!r}: value is not valid YAML: {err}") from None
