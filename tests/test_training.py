"""Self-distillation: the shared-prefix step, DeepSpeed + LoRA training, resume, 2 processes, pinned losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from matryoshka_reranker.core.distributed import TRAINING_STATE_VARS
from matryoshka_reranker.model.adapters import merge_adapters
from matryoshka_reranker.model.losses import TrainMethod, matryoshka_loss
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.training.data import (
    GroupCollator,
    GroupDataset,
    load_training_file,
)
from matryoshka_reranker.training.trainer import (
    CompressionPlan,
    FrozenWeightsInBf16,
    MatryoshkaTrainingModel,
    find_resume_checkpoint,
    load_base,
    pair_encoder,
    self_distill,
)
from tests.fixtures import make_tiny_model
from tests.train_fixtures import TRAIN_ROWS, one_thread, tiny_params, write_jsonl  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[1]
ZERO1 = str(ROOT / "configs" / "deepspeed" / "zero1.json")
PINNED = ROOT / "tests" / "data" / "pinned_self_distill_losses.json"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


def fixed_batch(params, tokenizer):
    """All training groups of epoch 0, collated once: a fixed yardstick for loss and scores."""
    examples = load_training_file(params.paths.teacher_scored)
    dataset = GroupDataset(examples, params.self_distill.train_group_size, params.self_distill.seed)
    return GroupCollator(pair_encoder(params, tokenizer))([dataset[i] for i in range(len(dataset))])


def exit_scores(model: MatryoshkaModel, batch) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "teacher_scores"}
    with torch.no_grad():
        return MatryoshkaModel.forward(model, **inputs, cutoff_layers=model.exit_layers)


def ranking_loss(model: MatryoshkaModel, params, batch) -> float:
    """Listwise cross-entropy summed over exits (the part of the loss that can reach zero)."""
    step = MatryoshkaTrainingModel.from_model(model, TrainMethod("normal"), params.self_distill.train_group_size).eval()
    with torch.no_grad():
        return step(**batch)["loss"].item()


@pytest.fixture
def scored(tmp_path):
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    return tmp_path / "scored.jsonl"


# ----------------------------------------------------------------------------- the training step
@pytest.mark.parametrize("method", ["distill_fix_layer_teacher", "distill_last_layer", "teacher", "normal"])
def test_shared_prefix_step_equals_two_full_passes(tmp_path, scored, llama_dir, tokenizer, method):
    params = tiny_params(tmp_path, llama_dir, self_distill__train_method=method, self_distill__fix_layer_every=2)
    batch = fixed_batch(params, tokenizer)
    model, _, _ = load_base(params)
    step = MatryoshkaTrainingModel.from_model(model, TrainMethod(method, 2), 3).train()
    ours = step(**batch, compress_layers=[2], compress_ratio=2)
    ours["loss"].backward()
    ours_grads = [p.grad.clone() for p in step.parameters() if p.grad is not None]
    step.zero_grad()

    inputs = {k: v for k, v in batch.items() if k != "teacher_scores"}
    exits = step.exit_layers
    student = MatryoshkaModel.forward(step, **inputs, cutoff_layers=exits, compress_layers=[2], compress_ratio=2)
    full = MatryoshkaModel.forward(step, **inputs, cutoff_layers=exits)  # upstream's second full pass
    grouped = lambda scores: [s.view(-1, 3) for s in scores]  # noqa: E731
    naive, per_layer = matryoshka_loss(grouped(student), TrainMethod(method, 2), grouped(full), batch["teacher_scores"])
    naive.backward()
    naive_grads = [p.grad for p in step.parameters() if p.grad is not None]
    assert ours["loss"].item() == pytest.approx(naive.item(), rel=1e-6)
    torch.testing.assert_close(ours["per_layer_loss"], per_layer)
    assert len(ours_grads) == len(naive_grads) > 0
    for a, b in zip(ours_grads, naive_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["distill_fix_layer_teacher", "same_layer_mse", "normal"])
@pytest.mark.parametrize("compress", [dict(), dict(compress_layers=[2], compress_ratio=2)])
def test_the_step_runs_its_deepest_layer_for_the_last_token_with_the_same_loss_and_gradients(
        tmp_path, scored, llama_dir, tokenizer, method, compress, monkeypatch):
    """Training's passes that end at the deepest layer run it for each row's last token only (nothing else
    there feeds a score): loss and every gradient equal the whole layer's (reference, full-width and
    compressed branches alike)."""
    from peft import get_peft_model

    from matryoshka_reranker.model import modeling
    from matryoshka_reranker.model.adapters import lora_config

    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    model, _, _ = load_base(params)
    step = MatryoshkaTrainingModel.from_model(model, TrainMethod(method), 3)
    peft = get_peft_model(step, lora_config(params.self_distill.lora, model.exit_layers)).train()
    generator = torch.Generator().manual_seed(0)
    for name, p in peft.named_parameters():  # a non-zero adapter: same_layer's reference then differs
        if "lora_B" in name:
            p.data.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    results = []
    for trimmed in (True, False):
        if not trimmed:
            monkeypatch.setattr(modeling, "trim_problem", lambda layer: "whole, for the comparison")
        calls = []
        hook = step.decoder.layers[-1].register_forward_hook(lambda m, i, o: calls.append(o.shape))
        out = peft(**batch, **compress)
        hook.remove()
        assert bool(calls) != trimmed  # the whole layer's forward runs only when trimming is off
        out["loss"].backward()
        results.append((out["loss"].item(), [p.grad.clone() for p in peft.parameters() if p.grad is not None]))
        peft.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["same_layer", "same_layer_mse"])
def test_same_layer_step_learns_the_model_without_the_adapter(name, tmp_path, scored, llama_dir, tokenizer):
    """Token compensation's step: compressed scores with the adapter on, targets with it off (soft
    cross-entropy or, with ``mse``, squared error of the scores)."""
    from peft import get_peft_model

    from matryoshka_reranker.model.adapters import lora_config

    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    model, _, _ = load_base(params)
    method = TrainMethod(name)
    step = MatryoshkaTrainingModel.from_model(model, method, 3)
    peft = get_peft_model(step, lora_config(params.self_distill.lora, model.exit_layers)).train()
    generator = torch.Generator().manual_seed(0)  # its own seed: the global RNG depends on the tests before
    for param_name, p in peft.named_parameters():  # a non-zero adapter (LoRA B starts at 0), heads changed too
        if "lora_B" in param_name or "modules_to_save" in param_name:
            p.data.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    out = peft(**batch, compress_layers=[2], compress_ratio=2)
    out["loss"].backward()
    assert {n for n, p in peft.named_parameters() if p.requires_grad} == trainable  # adapters back on
    assert all(peft.get_parameter(n).grad is not None for n in trainable if "lora_A" in n)

    inputs = {k: v for k, v in batch.items() if k != "teacher_scores"}
    exits = step.exit_layers
    with torch.no_grad():
        student = MatryoshkaModel.forward(step, **inputs, cutoff_layers=exits, compress_layers=[2], compress_ratio=2)
        with peft.disable_adapter():
            reference = MatryoshkaModel.forward(step, **inputs, cutoff_layers=exits)
        adapted = MatryoshkaModel.forward(step, **inputs, cutoff_layers=exits)
    grouped = lambda scores: [s.view(-1, 3) for s in scores]  # noqa: E731
    expected, per_layer = matryoshka_loss(grouped(student), method, grouped(reference))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out["per_layer_loss"], per_layer, atol=1e-5, rtol=1e-5)
    # The targets really are the adapter-free model's: with the adapter on they would differ.
    wrong, _ = matryoshka_loss(grouped(student), method, grouped(adapted))
    assert wrong.item() != pytest.approx(expected.item(), rel=1e-2)  # >= 6% apart with this seed


def test_same_layer_is_refused_where_its_reference_is_wrong(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="same_layer"):
        tiny_params(tmp_path, llama_dir, self_distill__train_method="distill_same_layer")
    params = tiny_params(tmp_path, llama_dir, compensation__token__train_method="same_layer")
    assert params.compensation.token.train_method == "same_layer"
    with pytest.raises(ValueError, match="layer adapter"):
        tiny_params(tmp_path, llama_dir, compensation__layer__train_method="same_layer")
    with pytest.raises(ValueError, match="head_init"):
        tiny_params(tmp_path, llama_dir, compensation__token__train_method="same_layer",
                    compensation__token__head_init="probe")


def test_settings_that_depend_on_the_model_fail_when_it_loads(tmp_path, llama_dir):
    """Depth and positions are the model's, so params alone cannot check them: ``load_base`` does, before
    the probe or any step (a 24-layer model with exit 30, say, would otherwise fail at the export)."""
    from matryoshka_reranker.core.errors import InputError

    model, _, _ = load_base(tiny_params(tmp_path, llama_dir))  # the tiny model: 4 layers, exits 1..4
    assert model.num_layers == 4
    params = tiny_params(tmp_path, llama_dir, export__exit_layers=[2, 6], compression__layers=[4],
                         export__compress_layers=[4], self_distill__layer_weights={5: 2.0},
                         compensation__layer__lora__layer_ranks={9: 8},
                         compensation__token__lora__target_modules=["q_proj", "qkv_proj", "mlp.down_proj", "score_heads"],
                         model__passage_max_len=model.max_sequence_length)
    with pytest.raises(InputError) as err:
        load_base(params)
    for key in ("export.exit_layers [6]", "compression.layers [4] outside [1, 3]", "export.compress_layers [4]",
                "self_distill.layer_weights [5]", "compensation.layer.lora.layer_ranks [9]",
                "compensation.token.lora.target_modules ['qkv_proj']: no such linear layer in this model (its "
                "linear and embedding layers: down_proj, embed_tokens, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)",
                "model.query_max_len + model.passage_max_len"):
        assert key in str(err.value), key


def test_compression_on_a_layer_class_it_cannot_reproduce_fails_when_the_model_loads(tmp_path, tokenizer):
    """SmolLM3 (RoPE-free layers among Llama-like ones) loads and trains at ratio 1, but compression's merge
    weights would be wrong there: refused by ``load_base``, before any training, not at a sampled step."""
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from matryoshka_reranker.core.errors import InputError
    from tests.fixtures import tiny_settings

    folder = tmp_path / "tiny-smollm3"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(SmolLM3Config(**tiny_settings(len(tokenizer)))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(InputError, match=r"compression.layers \[2\]: compression's merge weights.*SmolLM3DecoderLayer"):
        load_base(tiny_params(tmp_path, folder))
    model, _, _ = load_base(tiny_params(tmp_path, folder, compression__ratios=[1], export__ratios=[1],
                                        compensation__token_ratios=[]))
    assert model.num_layers == 4


def test_layer_weights_weigh_the_step_loss_per_exit(tmp_path, scored, llama_dir, tokenizer):
    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    model, _, _ = load_base(params)
    shallow = model.exit_layers[0]
    plain = MatryoshkaTrainingModel.from_model(model, TrainMethod("normal"), 3).eval()
    weighted = MatryoshkaTrainingModel.from_model(model, TrainMethod("normal"), 3, {shallow: 5.0}).eval()
    with torch.no_grad():
        a, b = plain(**batch), weighted(**batch)
    torch.testing.assert_close(a["per_layer_loss"], b["per_layer_loss"])
    assert b["loss"].item() == pytest.approx(a["loss"].item() + 4 * a["per_layer_loss"][0].item(), rel=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        MatryoshkaTrainingModel.from_model(model, TrainMethod("normal"), 3, {model.num_layers + 1: 2.0})


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, scored, llama_dir, tokenizer):
    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    grads = []
    for checkpointing in (False, True):
        model, _, _ = load_base(params)
        step = MatryoshkaTrainingModel.from_model(model, TrainMethod("distill_last_layer_teacher"), 3).train()
        if checkpointing:
            step.gradient_checkpointing_enable({"use_reentrant": False})
        step(**batch, compress_layers=[2], compress_ratio=2)["loss"].backward()
        grads.append([p.grad for p in step.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compression_plan_is_deterministic_per_step():
    plan = CompressionPlan((8, 16), (1, 2, 4))
    draws = [plan.draw(42, step) for step in range(64)]
    assert draws == [plan.draw(42, step) for step in range(64)]
    assert {tuple(layers) for layers, ratio in draws if ratio > 1} == {(), (8,), (16,), (8, 16)}
    assert all(layers == [] for layers, ratio in draws if ratio == 1)
    assert CompressionPlan((8,), (2,), sample=False).draw(0, 5) == ([8], 2)


# --------------------------------------------------------------------------------- real training
class CaptureScores(TrainerCallback):
    """Scores of the in-memory trained model at the end of training (before it is saved)."""

    def __init__(self, batch):
        self.batch, self.scores, self.dtypes = batch, None, set()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.dtypes = {p.dtype for p in model.parameters()}
        self.scores = exit_scores(model.get_base_model(), self.batch)


class CrashAfterSave(TrainerCallback):
    """Simulates a kill right after the checkpoint at ``step`` is on disk."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated kill after step {self.step}")


@pytest.mark.slow
def test_deepspeed_lora_run_learns_and_adapter_reloads_exactly(tmp_path, scored, llama_dir, tokenizer, monkeypatch):
    params = tiny_params(tmp_path, llama_dir, self_distill__deepspeed=ZERO1, self_distill__max_steps=6,
                         self_distill__save_steps=6, self_distill__learning_rate=0.05,
                         self_distill__per_device_batch_size=3)
    batch = fixed_batch(params, tokenizer)
    base, _, _ = load_base(params)
    before = ranking_loss(base, params, batch)
    capture = CaptureScores(batch)
    summary = self_distill(params, callbacks=[capture])
    assert summary["steps"] == 6 and summary["deepspeed"] == ZERO1 and summary["world_size"] == 1
    # a child process (a DVC stage) must not inherit the 1-process world declared for DeepSpeed: its
    # MASTER_PORT is held by this process's process group
    assert {"RANK", "MASTER_PORT"} <= set(os.environ)
    from matryoshka_reranker.pipeline.repro import tool_env
    monkeypatch.setenv("MASTER_PORT", "12345")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not set(TRAINING_STATE_VARS) & set(tool_env())

    reloaded = merge_adapters(load_base(params)[0], [params.paths.self_distill])
    for trained, again in zip(capture.scores, exit_scores(reloaded, batch)):
        # merged LoRA (W + BA) vs the unmerged forward differ by float32 rounding (~1e-6 seen on CI)
        torch.testing.assert_close(trained, again, atol=1e-5, rtol=0)
    assert ranking_loss(reloaded, params, batch) < 0.8 * before

    adapter = load_file(Path(params.paths.self_distill) / "adapter_model.safetensors")
    assert any("score_heads.4" in k for k in adapter)  # the heads are adapted too
    log = json.loads((Path(params.paths.self_distill) / "training_log.json").read_text())
    steps = [h for h in log["log_history"] if "loss" in h]
    assert len(steps) == 6 and all(f"loss_exit_{k:02d}" in h for h in steps for k in (1, 2, 3, 4))
    assert not (Path(params.paths.self_distill) / "training_args.bin").exists()


class RecordDtypes(TrainerCallback):
    """At the first step: the dtype of every trainable weight, of the frozen q projections, and of a decoder
    projection's output."""

    def __init__(self):
        self.weights, self.frozen, self.compute, self.reduce = {}, set(), set(), set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.weights = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
            self.frozen = {p.dtype for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.weight")}
            # DeepSpeed reduces a gradient in its parameter's ``comm_dtype`` when torch_autocast set one
            self.reduce = {getattr(p, "comm_dtype", p.dtype) for p in model.parameters() if p.requires_grad}
            proj = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
            self.hook = proj.register_forward_hook(lambda module, inputs, output: self.compute.add(output.dtype))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.hook.remove()  # the callbacks after training score outside autocast


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [ZERO1, None], ids=["deepspeed", "trainer"])
def test_bf16_autocast_trains_fp32_weights_with_bf16_compute(tmp_path, scored, llama_dir, tokenizer, deepspeed):
    """self_distill.bf16_autocast (the 1.4x CPU step on AMX): DeepSpeed's torch_autocast or the Trainer's
    bf16 autocast; LoRA weights and heads stay fp32 (not DeepSpeed's bf16 mode, which casts them),
    the decoder's GEMMs run in bf16, the heads' logits in fp32, and the run learns."""
    params = tiny_params(tmp_path, llama_dir, self_distill__deepspeed=deepspeed, self_distill__max_steps=6,
                         self_distill__save_steps=6, self_distill__learning_rate=0.02,
                         self_distill__per_device_batch_size=3, self_distill__bf16_autocast=True,
                         self_distill__head_init="probe")
    batch = fixed_batch(params, tokenizer)
    before = ranking_loss(load_base(params)[0], params, batch)
    dtypes, capture = RecordDtypes(), CaptureScores(batch)
    summary = self_distill(params, callbacks=[dtypes, capture])
    assert summary["steps"] == 6 and summary["dtype"] == "float32" and summary["bf16_autocast"] is True
    assert summary["head_init"]["groups"] > 0  # the probe's forward passes ran under autocast too
    assert dtypes.weights and set(dtypes.weights.values()) == {torch.float32} and dtypes.reduce == {torch.float32}
    assert any("score_heads" in n for n in dtypes.weights)
    assert dtypes.compute == {torch.bfloat16}
    assert dtypes.frozen == {torch.bfloat16}  # stored in bf16 for the run (FrozenWeightsInBf16)
    assert capture.dtypes == {torch.float32}  # and put back before the other callbacks' on_train_end
    reloaded = merge_adapters(load_base(params)[0], [params.paths.self_distill])
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    # At lr 0.05 (until 2026-12-07) the probe's heads made this 6-step run diverge or not by bf16 rounding alone (the
    # deepest layer run for the last token only, equal within bf16 noise, took it from 0.6x to 2x the loss); at
    # 0.02 it learns with a margin either way: 0.37x with that layer for the last token, 0.31x whole
    assert ranking_loss(reloaded, params, batch) < 0.9 * before


class CrashAtStep(TrainerCallback):
    """Keeps the model it is handed and fails the run at ``step``."""

    def __init__(self, step):
        self.step, self.model = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.model = model
        if state.global_step == self.step:
            raise RuntimeError(f"simulated failure at step {self.step}")


def test_a_failed_bf16_autocast_run_puts_the_fp32_weights_back(tmp_path, scored, llama_dir):
    params = tiny_params(tmp_path, llama_dir, self_distill__bf16_autocast=True)
    crash = CrashAtStep(1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        self_distill(params, callbacks=[crash])
    assert crash.model is not None and {p.dtype for p in crash.model.parameters()} == {torch.float32}


def test_score_heads_give_fp32_logits_under_bf16_autocast(llama_dir):
    model = MatryoshkaModel.from_pretrained(llama_dir, start_layer=1)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.embed(ids, mask)
        state, _ = model.advance(state, 2, set())
        autocast_logits = model.score(state)
    exit_state = model.exit_state(state).float()
    expected = exit_state @ model.score_heads["2"].weight[0]  # fp32 product of the same bf16-made state
    assert autocast_logits.dtype == torch.float32
    torch.testing.assert_close(autocast_logits, expected, atol=1e-5, rtol=1e-5)


def test_frozen_weights_in_bf16_give_the_same_autocast_step_and_are_put_back(tmp_path, scored, llama_dir, tokenizer):
    """Under bf16 autocast the frozen projections are stored in bf16 for the run: the same loss and LoRA /
    head gradients as autocast casting them at every use (one rounding either way), fp32 afterwards."""
    from peft import get_peft_model

    from matryoshka_reranker.model.adapters import lora_config

    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    model, _, _ = load_base(params)
    step = MatryoshkaTrainingModel.from_model(model, TrainMethod("same_layer_mse"), 3)
    step = get_peft_model(step, lora_config(params.self_distill.lora, model.exit_layers)).train()
    for p in step.parameters():
        if p.requires_grad:  # LoRA B starts at zero: give every trainable weight a value
            torch.nn.init.normal_(p, std=0.02)
    before = [(p, p.detach().clone()) for p in model.parameters()]
    frozen = FrozenWeightsInBf16(model.decoder.layers)
    results = []
    for cast in (False, True):
        if cast:
            frozen.cast()
            dtypes = {n: p.dtype for n, p in model.named_parameters()}
            assert {dtypes[n] for n in dtypes if n.endswith(("q_proj.base_layer.weight", "down_proj.weight"))} == {torch.bfloat16}
            assert {dtypes[n] for n in dtypes if "norm" in n or "embed" in n or "score_heads" in n} == {torch.float32}
        step.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(**batch, compress_layers=[2], compress_ratio=2)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}))
    frozen.restore()
    (loss, grads), (loss_cast, grads_cast) = results
    assert grads and grads.keys() == grads_cast.keys() and any("score_heads" in n for n in grads)
    torch.testing.assert_close(loss_cast, loss, atol=0, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads_cast[n], grads[n], atol=0, rtol=0)
    assert all(p.dtype == torch.float32 and torch.equal(p, saved) for p, saved in before)


@pytest.mark.slow
def test_interrupted_deepspeed_training_resumes_to_the_same_result(tmp_path, llama_dir):
    results = {}
    for name in ("interrupted", "straight"):
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / "scored.jsonl", TRAIN_ROWS)
        params = tiny_params(folder, llama_dir, self_distill__deepspeed=ZERO1)  # 4 steps, checkpoint every 2
        if name == "interrupted":
            with pytest.raises(KeyboardInterrupt):
                self_distill(params, callbacks=[CrashAfterSave(2)])
            assert not Path(params.paths.self_distill).exists()
            assert (folder / "checkpoints" / "self_distill" / "checkpoint-2" / "trainer_state.json").exists()
        summary = self_distill(params)
        assert summary["steps"] == 4
        assert (summary["resumed_from"] or "").endswith("checkpoint-2") == (name == "interrupted")
        results[name] = load_file(Path(params.paths.self_distill) / "adapter_model.safetensors")
    assert results["interrupted"].keys() == results["straight"].keys()
    for key in results["straight"]:
        torch.testing.assert_close(results["interrupted"][key], results["straight"][key], atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("deepspeed", [None, ZERO1], ids=["plain", "zero1"])
def test_a_rerun_over_the_final_checkpoint_trains_no_step_more(tmp_path, llama_dir, deepspeed):
    """transformers checks max_steps only after a step: a run resumed from its final checkpoint (a stage
    re-run with -f) trained step max_steps + 1, and one more at every re-run."""
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    params = tiny_params(tmp_path, llama_dir, self_distill__deepspeed=deepspeed, self_distill__save_steps=4)
    first = self_distill(params)
    trained = load_file(Path(params.paths.self_distill) / "adapter_model.safetensors")
    again = self_distill(params)
    assert again["steps"] == first["steps"] == 4 and again["resumed_from"].endswith("checkpoint-4")
    assert [p.name for p in (tmp_path / "checkpoints" / "self_distill").glob("checkpoint-*")] == ["checkpoint-4"]
    assert [h for h in again["log_history"] if "loss" in h] == [h for h in first["log_history"] if "loss" in h]
    for key, value in load_file(Path(params.paths.self_distill) / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0)


def test_a_checkpoint_is_found_again_when_its_fingerprint_has_per_layer_settings(tmp_path):
    """JSON turns {8: 64} into {"8": 64} and tuples into lists; the run that wrote it must still match."""
    fingerprint = {"train": {"lora": {"layer_ranks": {8: 64}}, "layer_weights": {8: 8.0}}, "layers": (8,)}
    checkpoint = tmp_path / "checkpoint-50"
    checkpoint.mkdir()
    assert find_resume_checkpoint(tmp_path, fingerprint) is None  # no state yet: incomplete, removed
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    assert find_resume_checkpoint(tmp_path, fingerprint) == checkpoint
    assert find_resume_checkpoint(tmp_path, fingerprint) == checkpoint  # again, from the recorded file
    other = {**fingerprint, "train": {"lora": {"layer_ranks": {8: 32}}, "layer_weights": {8: 8.0}}}
    assert find_resume_checkpoint(tmp_path, other) is None and not checkpoint.exists()


def test_changed_config_never_resumes_a_stale_checkpoint(tmp_path, scored, llama_dir):
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2)
    assert self_distill(params)["resumed_from"] is None
    assert self_distill(params)["resumed_from"].endswith("checkpoint-2")  # same config: resumes (0 steps left)
    changed = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2, self_distill__learning_rate=0.005)
    assert self_distill(changed)["resumed_from"] is None
    write_jsonl(scored, TRAIN_ROWS[:2])  # changed data
    assert self_distill(changed)["resumed_from"] is None


def test_other_weights_at_the_same_model_path_never_resume(tmp_path, scored, llama_dir, tokenizer):
    """A user who replaces the weights in their model folder (a new fine-tune, same config.json) and re-runs got
    the checkpoints trained on the old weights resumed, or the old final adapter shipped: only the folder's
    config was hashed. Now every file of the folder is."""
    model_dir = tmp_path / "my-model"
    shutil.copytree(llama_dir, model_dir)
    params = tiny_params(tmp_path, model_dir, self_distill__max_steps=2)
    assert self_distill(params)["resumed_from"] is None
    assert self_distill(params)["resumed_from"].endswith("checkpoint-2")  # same weights: resumes
    (model_dir / "README.md").write_text("notes beside the model: not read by loading\n")
    assert self_distill(params)["resumed_from"].endswith("checkpoint-2")
    other = make_tiny_model("llama", tokenizer, seed=1)
    other.save_pretrained(model_dir)
    assert (model_dir / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
    assert self_distill(params)["resumed_from"] is None


def test_a_code_change_never_resumes_or_ships_the_earlier_codes_checkpoint(tmp_path, scored, llama_dir, monkeypatch):
    """DVC re-runs a training stage after a change in its code deps (a new loss, a fixed step); the checkpoints
    outlive the run, so the re-run resumed the final checkpoint of the earlier code and shipped its adapter
    in seconds as this code's. Here the package is a copy whose training code is then changed."""
    from matryoshka_reranker.training import trainer

    code = tmp_path / "code"
    shutil.copytree(Path(trainer.__file__).resolve().parents[1], code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(trainer, "CODE_ROOT", code, raising=False)
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2)
    assert self_distill(params)["resumed_from"] is None
    assert self_distill(params)["resumed_from"].endswith("checkpoint-2")  # the same code resumes
    losses = code / "model" / "losses.py"
    losses.write_text(losses.read_text() + "\n# another loss\n")
    assert self_distill(params)["resumed_from"] is None
    (code / "pipeline" / "export.py").write_text("# not a dependency of training\n")
    (code / "serving" / "server.py").write_text("# the HTTP server: not a dependency of training either\n")
    assert self_distill(params)["resumed_from"].endswith("checkpoint-2")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("self_distill", "compensate", "specialize"):  # the digest covers the code DVC re-runs them for
        code_deps = {d.removeprefix("src/matryoshka_reranker/") for d in stages[stage]["deps"] if d.startswith("src/")}
        assert code_deps == set(trainer.TRAINING_CODE), stage


def test_a_checkpoint_whose_trainer_state_was_cut_short_is_not_resumed(tmp_path, scored, llama_dir):
    """A kill (or a power loss before the data reached the disk) while the Trainer writes trainer_state.json,
    its last file, leaves the file cut short: the checkpoint counted as complete, and every re-run failed
    loading it. The checkpoint before it (rotated only after the new one is complete) is resumed instead."""
    params = tiny_params(tmp_path, llama_dir)  # 4 steps, checkpoint every 2
    with pytest.raises(KeyboardInterrupt):
        self_distill(params, callbacks=[CrashAfterSave(2)])
    folder = tmp_path / "checkpoints" / "self_distill"
    shutil.copytree(folder / "checkpoint-2", folder / "checkpoint-4")
    state = folder / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    summary = self_distill(params)
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-2")


def test_a_resumed_run_records_the_probe_its_heads_started_from(tmp_path, llama_dir):
    """The probe runs only in a fresh run (a resumed one restores its trained heads); the resumed run's
    training log said head_init null, as if the heads had never been fitted."""
    logs = {}
    for name in ("interrupted", "straight"):
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / "scored.jsonl", TRAIN_ROWS)
        params = tiny_params(folder, llama_dir, self_distill__head_init="probe", self_distill__probe_queries=0)
        if name == "interrupted":
            with pytest.raises(KeyboardInterrupt):
                self_distill(params, callbacks=[CrashAfterSave(2)])
        summary = self_distill(params)
        assert (summary["resumed_from"] or "").endswith("checkpoint-2") == (name == "interrupted")
        logs[name] = json.loads((Path(params.paths.self_distill) / "training_log.json").read_text())["head_init"]
        logs[name].pop("seconds")
    assert logs["interrupted"] == logs["straight"] and logs["straight"]["groups"] == len(TRAIN_ROWS)
    other = tiny_params(tmp_path / "interrupted", llama_dir, self_distill__max_steps=2, self_distill__save_steps=2)
    assert self_distill(other)["head_init"] is None  # another run without a probe records none
    assert self_distill(other)["head_init"] is None  # nor when it resumes


def test_pinned_per_layer_losses(tmp_path, scored, tokenizer):
    """A short run's logged per-exit losses must match the stored ones (torchtune style).

    Regenerate after an intended change: ``MATRYOSHKA_PIN_LOSSES=1 pytest tests/test_training.py -k pinned``.
    """
    model_dir = tmp_path / "pinned-llama"
    make_tiny_model("llama", tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = tiny_params(tmp_path, model_dir, self_distill__max_steps=3, self_distill__save_steps=3)
    history = self_distill(params)["log_history"]
    logged = [{k: v for k, v in h.items() if k.startswith("loss")} for h in history if "loss" in h]
    if os.environ.get("MATRYOSHKA_PIN_LOSSES"):
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps(logged, indent=2) + "\n")
    expected = json.loads(PINNED.read_text())
    assert len(logged) == len(expected) == 3
    for got, want in zip(logged, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


def test_probe_fits_every_head_before_training(tmp_path, scored, llama_dir, tokenizer):
    """The probe alone (0 LoRA steps' worth) lowers the ranking loss at every exit on its own data."""
    from matryoshka_reranker.training.heads import probe_heads

    params = tiny_params(tmp_path, llama_dir)
    batch = fixed_batch(params, tokenizer)
    model, tokenizer_, _ = load_base(params)
    before = ranking_loss(model, params, batch)
    heads_before = {k: h.weight.clone() for k, h in model.score_heads.items()}
    log = probe_heads(model, pair_encoder(params, tokenizer_), load_training_file(params.paths.teacher_scored),
                      queries=0, group_size=3, seed=params.self_distill.seed, l2=1e-3, use_teacher=False)
    assert log["groups"] == len(TRAIN_ROWS) and set(log["train_top1"]) == set(model.exit_layers)
    assert all(not torch.equal(heads_before[k], h.weight) for k, h in model.score_heads.items())
    assert ranking_loss(model, params, batch) < 0.8 * before


def test_probe_init_and_snapshots_in_a_run(tmp_path, scored, llama_dir):
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=4, self_distill__save_steps=4,
                         self_distill__head_init="probe", self_distill__probe_queries=0,
                         self_distill__snapshot_steps=[2])
    summary = self_distill(params)
    assert summary["head_init"]["groups"] == len(TRAIN_ROWS) and summary["snapshots"] == [2]
    snapshot = Path(params.paths.self_distill) / "snapshots" / "step-00002"
    assert (snapshot / "adapter_model.safetensors").exists() and (snapshot / "input_format.json").exists()
    adapter = load_file(Path(params.paths.self_distill) / "adapter_model.safetensors")
    assert any("score_heads.4" in k and "lora" not in k for k in adapter)  # full heads, not a LoRA on them


def test_probe_init_needs_heads_trained_as_full_weights(tmp_path, llama_dir):
    """The probe fits the base model's heads; a LoRA on the heads saves only its update, so the saved adapter
    merged onto the base scored with unfitted heads (exit scores 50-180 away from the trained model's)."""
    with pytest.raises(ValueError, match="lora.heads full"):
        tiny_params(tmp_path, llama_dir, self_distill__head_init="probe",
                    self_distill__lora={"rank": 4, "alpha": 8, "heads": "lora"})
    tiny_params(tmp_path, llama_dir, self_distill__lora={"rank": 4, "alpha": 8, "heads": "lora"})  # keep: fine


def test_a_fresh_run_does_not_ship_an_earlier_runs_snapshots(tmp_path, scored, llama_dir):
    """A run that starts over (another configuration) must not copy a snapshot it never took (one past its
    own max_steps, left by an earlier, longer run) into its adapter and learning curve."""
    longer = tiny_params(tmp_path, llama_dir, self_distill__max_steps=4, self_distill__save_steps=4,
                         self_distill__snapshot_steps=[2, 4])
    assert self_distill(longer)["snapshots"] == [2, 4]
    shorter = tiny_params(tmp_path, llama_dir, self_distill__max_steps=2, self_distill__save_steps=2,
                          self_distill__snapshot_steps=[2, 4])
    summary = self_distill(shorter)
    assert summary["resumed_from"] is None and summary["snapshots"] == [2]
    assert sorted(p.name for p in (Path(shorter.paths.self_distill) / "snapshots").iterdir()) == ["step-00002"]


class RecordGroupEpochs(TrainerCallback):
    def __init__(self):
        self.epochs = []

    def on_step_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.epochs.append(train_dataloader.dataset.epoch)


def test_every_epoch_samples_new_groups_under_several_processes(tmp_path, scored, llama_dir, monkeypatch):
    """Under several processes accelerate gives the epoch to its sharded batch sampler, never to the dataset:
    without the trainer's own hand-over every epoch would draw the same negatives of each query."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, SeedableRandomSampler

    dataset = GroupDataset(load_training_file(scored), 3)
    batches = torch.utils.data.BatchSampler(SeedableRandomSampler(dataset), 1, False)
    DataLoaderShard(dataset, batch_sampler=BatchSamplerShard(batches, num_processes=2, process_index=0)).set_epoch(1)
    assert dataset.epoch == 0  # accelerate's own behaviour with 2 processes

    def several_processes(self, epoch):  # DataLoaderShard.set_epoch when its batch sampler is a BatchSamplerShard
        self.iteration = epoch
        self.batch_sampler.sampler.set_epoch(epoch)

    monkeypatch.setattr(DataLoaderShard, "set_epoch", several_processes)
    record = RecordGroupEpochs()
    params = tiny_params(tmp_path, llama_dir, self_distill__max_steps=6, self_distill__save_steps=6)  # 3 per epoch
    self_distill(params, callbacks=[record])
    assert record.epochs == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_training_learns_to_rank_real_scifact_pairs(tmp_path):
    """Evidence that the recipe learns (the pinned-loss test only shows it is unchanged): on real
    SciFact training queries with BM25 negatives, a short run on the embedded SmolLM2 ranks those
    queries' candidates better than the untrained model ("Yes" logit) at the deepest and a shallow exit."""
    import random

    from matryoshka_reranker.pipeline.beir import load_corpus, load_qrels, load_queries
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker

    data = ROOT / "data" / "scifact"
    corpus, queries, qrels = load_corpus(data), load_queries(data), load_qrels(data, "train")
    ids = sorted(q for q in qrels if q in queries)[:24]
    rng = random.Random(0)
    docs = sorted(corpus)
    rows = []
    for q in ids:
        pos = [d for d, r in qrels[q].items() if r > 0 and d in corpus][:1]
        neg = rng.sample([d for d in docs if d not in qrels[q]], 3)
        rows.append({"query": queries[q], "pos": [corpus[d] for d in pos], "neg": [corpus[d] for d in neg]})
    write_jsonl(tmp_path / "scored.jsonl", rows)
    params = tiny_params(tmp_path, "embedded:smollm2-135m-instruct", model__start_layer=4,
                         model__query_max_len=24, model__passage_max_len=48,
                         self_distill__train_method="normal", self_distill__train_group_size=4,
                         self_distill__max_steps=24, self_distill__save_steps=24, self_distill__learning_rate=5e-4,
                         self_distill__head_init="probe", self_distill__probe_queries=0,
                         self_distill__lora={"rank": 8, "alpha": 16},
                         compression__layers=[8], compression__ratios=[1, 2],
                         compensation__token_ratios=[2], export__exit_layers=[8, 30], export__compress_layers=[8])
    self_distill(params)

    def accuracy(reranker):  # fraction of queries whose positive outscores all 3 negatives, per exit
        pairs = [(r["query"], p) for r in rows for p in r["pos"] + r["neg"]]
        scores = torch.tensor(reranker.compute_score(pairs, cutoff_layers=[8, 30])).view(2, len(rows), 4)
        return (scores.argmax(-1) == 0).float().mean(-1).tolist()

    fmt = params.model.input_format
    untrained = accuracy(MatryoshkaReranker(params.model.name_or_path, input_format=fmt, batch_size=16))
    trained = accuracy(MatryoshkaReranker(params.model.name_or_path, peft_path=params.paths.self_distill,
                                          batch_size=16))
    assert trained[0] >= untrained[0] + 0.25 and trained[1] >= untrained[1] + 0.25, (untrained, trained)


def test_bad_training_data_fails_naming_the_line(tmp_path, llama_dir):
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    write_jsonl(tmp_path / "scored.jsonl", [TRAIN_ROWS[0], {**TRAIN_ROWS[1], "neg_scores": [1.0]}])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(tmp_path, llama_dir).model_dump()))
    result = CliRunner().invoke(app, ["self-distill", "-p", str(params_file)])
    assert result.exit_code == 2
    assert "scored.jsonl:2: 'neg_scores' has 1 scores but 'neg' has 2 passages" in result.output


@pytest.mark.slow
def test_two_process_run_under_torchrun_with_deepspeed_completes(tmp_path, scored, llama_dir):
    params = tiny_params(tmp_path, llama_dir, self_distill__deepspeed=ZERO1, self_distill__max_steps=2,
                         self_distill__save_steps=2)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # set by earlier in-process DeepSpeed runs; torchrun sets its own
    # distributed.processes=2: the one-line stage command starts itself under torch.distributed.run
    command = [sys.executable, "-m", "matryoshka_reranker.cli", "self-distill", "-p", str(params_file),
               "-S", "distributed.processes=2"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]
    log = json.loads((Path(params.paths.self_distill) / "training_log.json").read_text())
    assert log["world_size"] == 2 and log["steps"] == 2
    assert "starting 2 worker processes" in output
    assert (Path(params.paths.self_distill) / "adapter_model.safetensors").exists()


def test_worker_processes_auto_is_one_without_cuda_and_launchers_are_respected(monkeypatch):
    from matryoshka_reranker.config import ParamsError, parse_params
    from matryoshka_reranker.training.trainer import (
        relaunch_distributed,
        worker_processes,
    )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_processes("auto") == 1 and worker_processes(3) == 3
    assert relaunch_distributed(1, ["self-distill"]) is None  # nothing to start
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert relaunch_distributed(4, ["self-distill"]) is None  # already a launcher's worker
    with pytest.raises(ParamsError, match="distributed.processes"):
        parse_params({"distributed": {"processes": 0}})


def test_layer_ranks_give_shallow_layers_a_larger_lora_with_the_same_step_size(tmp_path, scored, llama_dir):
    from peft import get_peft_model

    from matryoshka_reranker.model.adapters import lora_config

    params = tiny_params(tmp_path, llama_dir, self_distill__lora={"rank": 4, "alpha": 8, "layer_ranks": {2: 16}})
    model, _, _ = load_base(params)
    peft = get_peft_model(model, lora_config(params.self_distill.lora, model.exit_layers))
    ranks, scales = {}, {}
    for name, module in peft.named_modules():
        if name.endswith("q_proj") or name.endswith("down_proj"):
            layer = int(name.split("layers.")[1].split(".")[0]) + 1
            ranks.setdefault(layer, set()).add(module.r["default"])
            scales.setdefault(layer, set()).add(module.scaling["default"])
    assert ranks == {1: {16}, 2: {16}, 3: {4}, 4: {4}}
    assert scales == {k: {2.0} for k in (1, 2, 3, 4)}  # alpha / rank kept
    # trained and saved, the adapter reloads with its per-layer ranks (PEFT keeps rank_pattern)
    params = tiny_params(tmp_path, llama_dir, self_distill__lora={"rank": 4, "alpha": 8, "layer_ranks": {2: 16}},
                         self_distill__max_steps=2, self_distill__save_steps=2)
    self_distill(params)
    saved = load_file(Path(params.paths.self_distill) / "adapter_model.safetensors")
    shapes = {k.split("layers.")[1].split(".")[0]: v.shape[0] for k, v in saved.items() if "q_proj.lora_A" in k}
    assert shapes == {"0": 16, "1": 16, "2": 4, "3": 4}
    merge_adapters(load_base(params)[0], [params.paths.self_distill])
    with pytest.raises(ValueError, match="layer_ranks"):
        self_distill(tiny_params(tmp_path, llama_dir, self_distill__lora={"layer_ranks": {9: 16}}))


def test_remove_stale_adapters_keeps_only_the_configured_ones(tmp_path):
    """A token adapter for a ratio (or a specialist for an exit) no longer configured must go, or
    inference and export would pick it up; other folders and files stay."""
    from matryoshka_reranker.training.trainer import remove_stale_adapters

    for name in ("token-ratio-2", "token-ratio-4", "layer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "token-ratio-8.json").write_text("{}")  # a file, not an adapter folder
    remove_stale_adapters(tmp_path, "token-ratio-*", {"token-ratio-4"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer", "token-ratio-4", "token-ratio-8.json"]
