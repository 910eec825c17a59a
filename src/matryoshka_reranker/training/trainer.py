"""Training a LoRA adapter on a Matryoshka model: the self-distillation stage and its machinery.

One step (``MatryoshkaTrainingModel.forward``):

1. sample compression for this step: each of ``compression.layers`` on or off, one ratio from
   ``compression.ratios`` (as upstream), deterministic in (seed, global step) so a resumed run
   replays the same choices;
2. run the layers before the first active compression layer ONCE; their exits are identical for
   the compressed student and the full-width teacher;
3. branch: the full-width continuation runs without autograd (it only provides detached
   targets), the compressed continuation with it; upstream ran two complete forward passes;
4. ``losses.matryoshka_loss`` over all exits.

The HF ``Trainer`` runs the loop: PEFT LoRA from ``lora_config`` (score heads included),
DeepSpeed through ``TrainingArguments(deepspeed=...)`` (ZeRO configs in ``configs/deepspeed/``),
bf16 on GPU, fp32 on CPU, checkpoints every ``save_steps`` under ``paths.checkpoints/<stage>``.
A run resumes from the last complete checkpoint (optimizer, scheduler, RNG, data position) only
if a fingerprint of everything that shapes training matches; otherwise it starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..config import Params, TrainParams
from ..core.assets import load_tokenizer, resolve_model_path
from ..core.atomic import atomic_dir, sha256_file, write_json
from ..core.errors import InputError
from ..model.adapters import TRAINING_LOG, lora_config
from ..model.inputs import InputFormat, PairEncoder
from ..model.losses import TrainMethod, matryoshka_loss
from ..model.modeling import MatryoshkaModel
from .data import GroupCollator, GroupDataset, TrainingExample, load_training_file
from .heads import probe_heads

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
SNAPSHOTS = "snapshots"  # under the checkpoint folder: the adapter at ``snapshot_steps``
HEAD_INIT = "head_init.json"  # under the checkpoint folder: the probe's log, for a resumed run's summary
CODE_ROOT = Path(__file__).resolve().parents[1]  # the package; its training code enters the fingerprint
# The training stages' code deps (dvc.yaml): serving's scoring API (the teacher and the specialist score with
# MatryoshkaReranker), not its HTTP server, so a server change retrains nothing.
TRAINING_CODE = ("config.py", "core", "model", "serving/__init__.py", "serving/ranking.py", "serving/reranker.py",
                 "training")


# ------------------------------------------------------------------------------ the training step
@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Switches every PEFT adapter layer (LoRA and modules_to_save heads) of ``model`` off, then on.

    PEFT's own ``PeftModel.disable_adapter`` needs the wrapper, which the training step (the
    wrapped model's forward) does not see; the layers' public ``enable_adapters`` is the same switch.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
              and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class MatryoshkaTrainingModel(MatryoshkaModel):
    """A Matryoshka model whose ``forward`` is one training step's loss.

    It is the model class itself (not a wrapper) so that PEFT names the adapter weights exactly
    as on a plain ``MatryoshkaModel`` and the saved adapter loads for inference unchanged.
    """

    method: TrainMethod
    group_size: int
    loss_weights: list[float] | None = None  # per exit layer, deepest last (None: all 1)

    @classmethod
    def from_model(cls, model: MatryoshkaModel, method: TrainMethod, group_size: int,
                   layer_weights: dict[int, float] | None = None) -> MatryoshkaTrainingModel:
        """Shares ``model``'s decoder and heads (no copy). ``layer_weights``: {exit: loss weight}."""
        new = cls(model.decoder, model.start_layer, model.layer_sep)
        new.score_heads = model.score_heads
        new.method, new.group_size = method, group_size
        unknown = sorted(set(layer_weights or {}) - set(new.exit_layers))
        if unknown:
            raise ValueError(f"layer_weights names exit layer(s) {unknown} the model does not have "
                             f"(exits {new.exit_layers[0]}..{new.exit_layers[-1]})")
        if layer_weights:
            new.loss_weights = [float(layer_weights.get(k, 1.0)) for k in new.exit_layers]
        return new

    def forward(
        self,
        input_ids: torch.Tensor,  # (B*G, T) group-major, positive first
        attention_mask: torch.Tensor,  # (B*G, T)
        query_lengths: torch.Tensor,  # (B*G,)
        prompt_lengths: torch.Tensor,  # (B*G,)
        teacher_scores: torch.Tensor | None = None,  # (B, G)
        compress_layers: Sequence[int] = (),
        compress_ratio: int = 1,
    ) -> dict[str, torch.Tensor]:
        """{"loss": scalar, "per_layer_loss": (L,) detached, deepest exit last}."""
        compress_layers = self.check_compression(compress_layers, compress_ratio)
        exits, depth = set(self.exit_layers), self.num_layers
        # Every pass that ends at the deepest layer runs it for the last token only (its other positions feed
        # no score; ``last_token_layer``): the same loss and gradients, ~1/L of the step's layer work less.
        to_the_end = dict(last_token_only=True)
        state = self.embed(input_ids, attention_mask, query_lengths, prompt_lengths)
        if self.method.needs_reference:
            # Targets from the weights this adapter is stacked on: full width, adapters off, no grad.
            with torch.no_grad(), adapters_disabled(self):
                reference_state = self.embed(input_ids, attention_mask, query_lengths, prompt_lengths)
                _, reference = self.advance(reference_state, depth, exits, **to_the_end)
            _, student = self.advance(state, depth, exits, compress_layers, compress_ratio, **to_the_end)
            full = {k: v.detach() for k, v in reference.items()}
        elif compress_layers:
            # Shared prefix: layers 1..c (c = first compression layer) run once for both branches.
            state, prefix = self.advance(state, compress_layers[0], exits)
            full = None
            if self.method.needs_full_width:
                with torch.no_grad():  # the full-width branch only supplies detached targets
                    _, full = self.advance(state, depth, exits, **to_the_end)
                full = {**{k: v.detach() for k, v in prefix.items()}, **full}
            _, student = self.advance(state, depth, exits, compress_layers, compress_ratio, **to_the_end)
            student = {**prefix, **student}
        else:
            _, student = self.advance(state, depth, exits, **to_the_end)
            full = None  # identical to the student: matryoshka_loss detaches it
        loss, per_layer = matryoshka_loss(
            self._grouped(student), self.method, self._grouped(full) if full else None, teacher_scores,
            self.loss_weights,
        )
        return {"loss": loss, "per_layer_loss": per_layer}

    def _grouped(self, scores: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """{exit: (B*G,)} -> [(B, G)] in exit order, deepest last."""
        return [scores[k].view(-1, self.group_size) for k in self.exit_layers]


@dataclass(frozen=True)
class CompressionPlan:
    """Which compression a step uses. ``sample``: each layer on/off with p = 1/2 (upstream)."""

    layers: tuple[int, ...] = ()
    ratios: tuple[int, ...] = (1,)
    sample: bool = True

    def draw(self, seed: int, step: int, micro: int = 0) -> tuple[list[int], int]:
        rng = random.Random(f"{seed}/{step}/{micro}")
        layers = [c for c in self.layers if not self.sample or rng.random() < 0.5]
        ratio = rng.choice(self.ratios)
        return (layers, ratio) if ratio > 1 else ([], 1)


class SnapshotCallback(TrainerCallback):
    """Saves the adapter at chosen steps (for a learning curve), beside the checkpoints.

    A resumed run keeps the snapshots already taken; the stage copies them into its output.
    """

    def __init__(self, folder: Path, steps: Sequence[int], input_format):
        self.folder, self.steps, self.input_format = folder, set(steps), input_format
        self.trainer: Trainer | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps and self.trainer is not None:
            target = self.folder / f"step-{state.global_step:05d}"
            self.trainer.save_model(str(target))  # every rank joins (ZeRO-3); the main process writes
            if self.trainer.is_world_process_zero():
                (target / "training_args.bin").unlink(missing_ok=True)
                self.input_format.save(target)
        return control

    def steps_saved(self) -> list[int]:
        return sorted(k for k in self.steps if (self.folder / f"step-{k:05d}" / "adapter_config.json").exists())


class GroupEpochs(TrainerCallback):
    """Gives the ``GroupDataset`` each epoch's number, so every epoch samples its groups afresh.

    accelerate's ``DataLoaderShard.set_epoch`` reaches the dataset only with one process: under several
    its batch sampler is a ``BatchSamplerShard``, whose sampler takes the epoch instead, and every epoch
    would draw the same negatives of each query. ``state.epoch`` at an epoch's start is its number
    (fractional when resumed within it).
    """

    def __init__(self, dataset: GroupDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))
        return control


class _AlreadyTrained(Exception):
    """Raised at train begin when the resumed checkpoint already holds every step (see ``StopWhenComplete``)."""


class StopWhenComplete(TrainerCallback):
    """Ends a run resumed from a checkpoint at ``max_steps`` before it trains a step more.

    transformers' loop checks ``max_steps`` only after a step, so a run resumed from its final
    checkpoint (a stage re-run with ``-f``, or one killed after its last save) trained step
    ``max_steps + 1``, and one more at every re-run. At train begin the checkpoint's weights, optimizer
    and state are loaded; stopping there leaves exactly the trained model to save.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise _AlreadyTrained
        return control


class FrozenWeightsInBf16(TrainerCallback):
    """Under bf16 autocast, keeps the frozen ``nn.Linear`` weights of the decoder layers (LoRA's base layers)
    in bf16 while training.

    Autocast casts a fp32 weight to bf16 at every use and caches the cast only for weights that require
    grad, so every step re-casts every frozen projection, in the forward and in the no-grad reference pass
    (and in the recomputation under gradient checkpointing). Casting them once gives the very same bf16
    values (round to nearest either way), hence the same steps, without those casts
    (``benchmarks/bench_train_dtype``). Embeddings, norms, biases and score heads stay fp32 (the residual
    stream stays fp32). The fp32 weights are put back at the end of training, before the other callbacks'
    ``on_train_end`` and on failure, so the model that is then scored, merged or trained with the next
    adapter is the one that came in. In between, a callback that runs the model outside autocast would meet
    bf16 weights. ZeRO-3 partitioned weights (rebuilt from their fp32 shards at every gather) are left alone.
    """

    def __init__(self, layers: torch.nn.Module):
        self.layers = layers
        self._fp32: dict[torch.nn.Parameter, torch.Tensor] = {}

    def cast(self) -> None:
        for module in self.layers.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, torch.nn.Linear) and not weight.requires_grad and weight.dtype == torch.float32
                    and not hasattr(weight, "ds_id")):  # ds_id: a ZeRO-3 partition, cast at every gather anyway
                self._fp32[weight] = weight.data
                weight.data = weight.data.to(torch.bfloat16)

    def restore(self) -> None:
        for weight, data in self._fp32.items():
            weight.data = data
        self._fp32.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self.cast()

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


class MatryoshkaTrainer(Trainer):
    """HF Trainer drawing the step's compression and logging the loss of every exit layer."""

    def __init__(self, *args, plan: CompressionPlan, exit_layers: Sequence[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.exit_layers = plan, list(exit_layers)
        self._per_layer: list[torch.Tensor] = []
        self._draw_step, self._draws = -1, 0
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean; the Trainer scales for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        if step != self._draw_step:
            self._draw_step, self._draws = step, 0
        layers, ratio = self.plan.draw(self.args.seed, step, self._draws)
        self._draws += 1
        outputs = model(**inputs, compress_layers=layers, compress_ratio=ratio)
        if model.training:
            self._per_layer.append(outputs["per_layer_loss"].float().cpu())
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._per_layer:  # this process's mean since the last log
            mean = torch.stack(self._per_layer).mean(0).tolist()
            logs.update({f"loss_exit_{k:02d}": round(v, 6) for k, v in zip(self.exit_layers, mean)})
            self._per_layer.clear()
        super().log(logs, start_time)


# --------------------------------------------------------------------------- environment, resume
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed_env() -> None:
    """Without a launcher, DeepSpeed would try MPI discovery (mpi4py): declare a 1-process world.

    The variables stay in ``os.environ`` (a later training in this process reuses the process
    group); child processes must not inherit them: ``pipeline.repro.tool_env`` drops them.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def worker_processes(setting: int | str) -> int:
    """``distributed.processes`` as a number: ``auto`` is one per visible CUDA device (1 on CPU)."""
    if setting != "auto":
        return int(setting)
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def relaunch_distributed(processes: int, cli_args: Sequence[str]) -> int | None:
    """Runs this CLI command as ``processes`` workers under torch.distributed.run; returns its exit code.

    None when no relaunch is needed: one process, or already started by a launcher (torchrun and
    DeepSpeed's launcher set LOCAL_RANK). Lets a one-line DVC stage use every GPU of the machine.
    """
    if processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import subprocess
    import sys

    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "matryoshka_reranker.cli", *cli_args]
    log.info("starting %d worker processes: %s", processes, " ".join(command))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(command, env=env).returncode


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _complete(checkpoint: Path) -> bool:
    """Whether ``trainer_state.json``, the Trainer's last file, is there in full (a kill while it was being
    written, or a power loss before it reached the disk, leaves it cut short: not a checkpoint to load)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def find_resume_checkpoint(checkpoint_dir: Path, fingerprint: dict) -> Path | None:
    """The last complete checkpoint of this exact run, or None.

    Called by the main process first (``main_process_first``): it removes checkpoints of a run
    with another fingerprint and incomplete ones (no ``trainer_state.json``, written last), and, when
    there is nothing to resume, the snapshots of an earlier run (a fresh run takes its own). The
    fingerprint is compared as JSON records it: per-layer settings (``lora.layer_ranks: {8: 64}``)
    come back from the file with string keys, tuples as lists, and a run must still find its own.
    """
    fingerprint = json.loads(json.dumps(fingerprint))
    marker = checkpoint_dir / FINGERPRINT_FILE
    checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"), key=_step_of)
    recorded = json.loads(marker.read_text()) if marker.exists() else None
    main = int(os.environ.get("RANK", "0")) == 0
    if recorded != fingerprint and checkpoints:
        log.warning("checkpoints in %s are from a different configuration; starting over", checkpoint_dir)
        if main:
            for stale in checkpoints:
                shutil.rmtree(stale, ignore_errors=True)
        checkpoints = []
    complete = [c for c in checkpoints if _complete(c)]
    if main:
        for partial in [c for c in checkpoints if c not in complete]:
            log.warning("removing incomplete checkpoint %s", partial)
            shutil.rmtree(partial, ignore_errors=True)
        write_json(marker, fingerprint)
    if main and not complete:  # else an earlier run's snapshot past this run's max_steps would ship as this run's
        shutil.rmtree(checkpoint_dir / SNAPSHOTS, ignore_errors=True)
        (checkpoint_dir / HEAD_INIT).unlink(missing_ok=True)  # and its probe as this run's
    return complete[-1] if complete else None


# --------------------------------------------------------------------------------- one LoRA run
@dataclass
class AdapterRun:
    """Everything one adapter training needs; ``fingerprint`` guards resume."""

    stage: str
    model: MatryoshkaModel
    tokenizer: object
    encoder: PairEncoder
    examples: list[TrainingExample]
    train: TrainParams
    plan: CompressionPlan
    output_dir: Path
    checkpoint_dir: Path
    fingerprint: dict
    base_name: str = ""  # recorded in adapter_config.json
    callbacks: list[TrainerCallback] = field(default_factory=list)
    trained_on: Sequence[str] = ()  # digests of the adapters ``model`` has merged, taken before merging them


def bf16_autocast(train: TrainParams, dtype: torch.dtype) -> bool:
    """Whether this run computes under bf16 autocast: asked for, and the model is fp32."""
    return train.bf16_autocast and dtype == torch.float32


def training_arguments(train: TrainParams, checkpoint_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    """The Trainer's arguments. ``train.bf16_autocast`` on a fp32 model: DeepSpeed's ``torch_autocast``
    (fp32 weights and ZeRO partitions, bf16 compute) added to its config, or the Trainer's ``bf16``
    (autocast through accelerate) without DeepSpeed; DeepSpeed's own ``bf16`` mode would cast every
    weight, trainable ones and score heads included, to bf16."""
    deepspeed = None
    autocast = bf16_autocast(train, dtype)
    if train.bf16_autocast and not autocast:
        log.info("bf16_autocast: the model is already %s; training runs in it", dtype)
    if train.deepspeed:
        path = Path(train.deepspeed)
        if not path.exists():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
        deepspeed = str(path)
        if autocast:
            # no "lower precision safe" modules: DeepSpeed's default list (nn.Linear) would reduce the
            # LoRA and head gradients in bf16; here only the forward/backward compute is bf16
            deepspeed = {**json.loads(path.read_text(encoding="utf-8")),
                         "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
        ensure_distributed_env()
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        warmup_steps=round(train.warmup_ratio * train.max_steps),
        weight_decay=train.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,  # rotated only after the new checkpoint is complete
        seed=train.seed,
        bf16=dtype == torch.bfloat16 or (autocast and not deepspeed),
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        save_only_model=False,
        disable_tqdm=None,
    )


def train_adapter(run: AdapterRun) -> dict:
    """Trains one LoRA adapter and saves it atomically to ``run.output_dir``; returns its log.

    ``ACCELERATE_USE_DEEPSPEED`` (set by TrainingArguments for DeepSpeed) is put back as it was, even
    when the run fails: left set, a later run in this process without DeepSpeed but with bf16 autocast
    took accelerate's DeepSpeed route and had its fp32 weights cast to bf16."""
    launcher_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    try:
        return _train_adapter(run)
    finally:
        if launcher_deepspeed is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = launcher_deepspeed


def _train_adapter(run: AdapterRun) -> dict:
    from peft import get_peft_model
    from transformers import set_seed

    method = TrainMethod(run.train.train_method, run.train.fix_layer_every, run.train.temperature)
    if method.needs_teacher_scores and not all(e.has_scores for e in run.examples):
        raise ValueError(f"train_method {method.name!r} needs teacher scores; the training data has none "
                         "(run `matryoshka teacher-score`)")
    too_deep = [k for k in run.train.lora.layer_ranks if k > run.model.num_layers]
    if too_deep:
        raise ValueError(f"lora.layer_ranks names layer(s) {too_deep}; the model has {run.model.num_layers}")
    dtype = next(run.model.parameters()).dtype
    args = training_arguments(run.train, run.checkpoint_dir, dtype)
    fingerprint = {**run.fingerprint, "stage": run.stage, "world_size": args.world_size}
    with args.main_process_first(desc="checkpoint check"):
        resume = find_resume_checkpoint(run.checkpoint_dir, fingerprint)
    if resume:
        log.info("%s: resuming from %s", run.stage, resume)
    started = time.perf_counter()
    probe = None
    if run.train.head_init == "probe" and not resume:  # a resumed run restores its trained heads
        probe = probe_heads(run.model, run.encoder, run.examples, run.train.probe_queries,
                            run.train.train_group_size, run.train.seed, run.train.probe_l2,
                            use_teacher=method.needs_teacher_scores, temperature=method.temperature,
                            bf16_autocast=bf16_autocast(run.train, dtype))
        if args.process_index == 0:
            write_json(run.checkpoint_dir / HEAD_INIT, probe)
    elif run.train.head_init == "probe" and (run.checkpoint_dir / HEAD_INIT).is_file():
        probe = json.loads((run.checkpoint_dir / HEAD_INIT).read_text())  # the probe the resumed run's heads began as
    model = MatryoshkaTrainingModel.from_model(run.model, method, run.train.train_group_size, run.train.layer_weights)
    if run.train.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    set_seed(run.train.seed)  # LoRA initialisation draws from the global RNG
    model = get_peft_model(model, lora_config(run.train.lora, run.model.exit_layers))
    snapshots = SnapshotCallback(run.checkpoint_dir / SNAPSHOTS, run.train.snapshot_steps, run.encoder.format)
    frozen_bf16 = [FrozenWeightsInBf16(run.model.decoder.layers)] if bf16_autocast(run.train, dtype) else []
    dataset = GroupDataset(run.examples, run.train.train_group_size, run.train.seed)
    trainer = MatryoshkaTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=GroupCollator(run.encoder),
        callbacks=[StopWhenComplete(), *frozen_bf16, GroupEpochs(dataset), *run.callbacks, snapshots],
        plan=run.plan, exit_layers=run.model.exit_layers,
    )
    snapshots.trainer = trainer
    try:
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except _AlreadyTrained:
            log.info("%s: %s already holds all %d steps; nothing left to train", run.stage, resume, run.train.max_steps)
        if trainer.state.global_step < run.train.max_steps:
            raise RuntimeError(f"{run.stage}: training stopped at step {trainer.state.global_step} of "
                               f"{run.train.max_steps}; run again to resume")
        history = trainer.state.log_history
        summary = {
            "stage": run.stage, "train_method": method.name, "steps": trainer.state.global_step,
            "resumed_from": str(resume) if resume else None, "wall_seconds": round(time.perf_counter() - started, 2),
            "exit_layers": run.model.exit_layers, "world_size": args.world_size,
            "deepspeed": run.train.deepspeed, "dtype": str(dtype).removeprefix("torch."),
            "bf16_autocast": bf16_autocast(run.train, dtype),
            "fingerprint": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
            "head_init": probe, "snapshots": snapshots.steps_saved(),
            "trained_on": list(run.trained_on),  # what merging must put below it (adapters.check_stack)
            "compression": {"layers": list(run.plan.layers), "ratios": list(run.plan.ratios),  # the width(s) it
                            "sample": run.plan.sample},  # trained at: a token adapter's default (trained_compression)
            "log_history": history,
        }
        _save_adapter(trainer, run.output_dir, summary, run.base_name, run.encoder.format, snapshots.folder)
    finally:
        for callback in frozen_bf16:
            callback.restore()  # a failed run skips on_train_end
        _release_trainer_state(trainer)
    return summary


def _save_adapter(trainer: Trainer, output_dir: Path, summary: dict, base_name: str,
                  input_format: InputFormat, snapshots: Path | None = None) -> None:
    """Every rank joins (ZeRO-3 gathers the weights); the main process writes atomically.

    Snapshots taken during training (``snapshot_steps``) go under ``snapshots/step-NNNNN/``.
    """
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir) as tmp:
            trainer.save_model(str(tmp))
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the log below says it all
            _describe_adapter(tmp / "adapter_config.json", base_name)
            input_format.save(tmp)  # the model scores with the format it was trained with
            write_json(tmp / TRAINING_LOG, summary)
            for snapshot in sorted(snapshots.glob("step-*")) if snapshots and snapshots.is_dir() else []:
                if int(snapshot.name[5:]) in summary["snapshots"]:
                    shutil.copytree(snapshot, tmp / "snapshots" / snapshot.name)
        log.info("%s: adapter saved to %s", summary["stage"], output_dir)
    else:
        trainer.save_model(str(output_dir))  # joins collectives only; non-main ranks write nothing
    trainer.accelerator.wait_for_everyone()  # the next stage may read the adapter on any rank


def _describe_adapter(config_file: Path, base_name: str) -> None:
    """Names the inference class (not the training subclass) and the base model in the config."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config["auto_mapping"] = {"base_model_class": "MatryoshkaModel", "parent_library": "matryoshka_reranker.model.modeling"}
    write_json(config_file, config)


def _release_trainer_state(trainer: Trainer) -> None:
    """Lets a later training in the same process start clean (DeepSpeed/accelerate singletons)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainer.accelerator.free_memory()
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    GradientState._reset_state()


# -------------------------------------------------------------------------- the pipeline stage
def remove_stale_adapters(folder: Path, pattern: str, keep: set[str]) -> None:
    """Deletes the adapter folders under ``folder`` matching ``pattern`` whose names are not in ``keep``:
    an adapter for a ratio or exit no longer configured must not be picked up by inference or export."""
    for stale in sorted(Path(folder).glob(pattern)):
        if stale.is_dir() and stale.name not in keep:
            log.info("removing stale adapter %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def load_base(params: Params, tokenizer=None) -> tuple[MatryoshkaModel, object, Path]:
    """The base Matryoshka model (fp32 on CPU, bf16 on GPU), its tokenizer and folder."""
    path = resolve_model_path(params.model.name_or_path)
    tokenizer = tokenizer or load_tokenizer(path)
    dtype = params.model.torch_dtype()
    model = MatryoshkaModel.from_pretrained(path, start_layer=params.model.start_layer,
                                            layer_sep=params.model.layer_sep, dtype=dtype, tokenizer=tokenizer)
    check_against_model(params, model, pair_encoder(params, tokenizer), path)
    return model, tokenizer, path


def check_against_model(params: Params, model: MatryoshkaModel, encoder: PairEncoder, path: Path | str) -> None:
    """The settings that depend on the model's depth and positions, checked as soon as it loads (before
    the probe and the first step, not at the first sampled compression or at the export after all the
    training): every problem in one error, each naming its key. ``params`` cannot check these alone."""
    n, exits = model.num_layers, list(model.exit_layers)
    problems = []
    too_long = model.input_length_problem(encoder.longest)
    if too_long:
        problems.append(f"model.query_max_len + model.passage_max_len: {too_long}")
    problems += params.depth_problems(n, exits)
    from ..model.adapters import target_pattern

    adaptable = [name for name, module in model.decoder.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))]  # what PEFT's LoRA takes here
    linears = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
    for key, train in (("self_distill", params.self_distill), ("compensation.layer", params.compensation.layer),
                       ("compensation.token", params.compensation.token)):
        unmatched = [t for t in train.lora.target_modules if t != "score_heads"
                     and not any(re.fullmatch(target_pattern([t]), name) for name in adaptable)]
        if unmatched:  # PEFT adapts the names that match and silently skips the rest (Phi-3 fuses q/k/v)
            problems.append(f"{key}.lora.target_modules {unmatched}: no such linear layer in this model "
                            f"(its linear and embedding layers: {', '.join(linears)})")
    if max([*params.compression.ratios, *params.export.ratios]) > 1:  # else refused at the first compressed step
        from ..model.modeling import layout_problem

        for key, layers in (("compression.layers", params.compression.layers),
                            ("export.compress_layers", params.export.compress_layers)):
            refused = {c: layout_problem(model.decoder.layers[c - 1]) for c in layers if 1 <= c < n}
            refused = {c: why for c, why in refused.items() if why}
            if refused:
                problems.append(f"{key} {sorted(refused)}: compression's merge weights recompute that layer's attention, "
                                f"reproduced for Llama-style layers only ({next(iter(refused.values()))}); train and export "
                                f"uncompressed: compression.ratios [1], export.ratios [1], compensation.token_ratios []")
    if problems:
        raise InputError(f"params do not fit the model {path}: " + "; ".join(problems))


def pair_encoder(params: Params, tokenizer) -> PairEncoder:
    return params.model.input_format.encoder(tokenizer)


def base_fingerprint(params: Params, model_path: Path, data_file: Path) -> dict:
    """What every adapter run of this pipeline depends on (besides its own TrainParams)."""
    return {
        "model": params.model.model_dump(),
        "model_files_sha256": model_files_digest(model_path),
        "data_sha256": sha256_file(data_file),
        "code_sha256": code_digest(),
    }


MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tokenizer*", "special_tokens_map.json",
               "vocab.*", "merges.txt", "*.model", "matryoshka.json", "score_heads.safetensors")


def model_files_digest(model_path: Path) -> str | None:
    """sha256 over the files of the model folder that loading reads (config, weights, tokenizer: ``MODEL_FILES``),
    each hashed once per process while unchanged (``sha256_file``): new weights saved at the same path (a
    re-fine-tuned base, the config unchanged) must not resume, or ship, the checkpoints trained on the old ones.
    A README, a log or a GGUF copy beside them changes nothing. Hashing reads the weights once (~1 GB/s)."""
    if not model_path.is_dir():
        return None
    files = sorted({f for pattern in MODEL_FILES for f in model_path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def code_digest() -> str:
    """sha256 of the training stages' code (``TRAINING_CODE``, their code deps in dvc.yaml): DVC re-runs a stage
    after a change there, and its run must not resume (or, from the final checkpoint, ship) the earlier code's."""
    digest = hashlib.sha256()
    for part in TRAINING_CODE:
        path = CODE_ROOT / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file.relative_to(CODE_ROOT).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def self_distill(params: Params, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """The self-distillation stage: ``paths.teacher_scored`` -> LoRA adapter at ``paths.self_distill``."""
    train = params.self_distill
    data_file = Path(params.paths.teacher_scored)
    method = TrainMethod(train.train_method, train.fix_layer_every, train.temperature)
    examples = load_training_file(data_file, require_scores=method.needs_teacher_scores,
                                  prompt=params.model.prompt)
    model, tokenizer, path = load_base(params)
    plan = CompressionPlan(tuple(params.compression.layers), tuple(params.compression.ratios), sample=True)
    fingerprint = {**base_fingerprint(params, path, data_file), "train": train.model_dump(),
                   "compression": params.compression.model_dump(),
                   "deepspeed_sha256": sha256_file(train.deepspeed) if train.deepspeed else None}
    return train_adapter(AdapterRun(
        stage="self_distill", model=model, tokenizer=tokenizer, encoder=pair_encoder(params, tokenizer),
        examples=examples, train=train, plan=plan, output_dir=Path(params.paths.self_distill),
        checkpoint_dir=Path(params.paths.checkpoints) / "self_distill", fingerprint=fingerprint,
        base_name=params.model.name_or_path, callbacks=list(callbacks),
    ))
