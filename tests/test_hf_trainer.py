"""A patched transformers model trained by transformers' Trainer with MoETrainerCallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_load import VOCAB, tiny_hf_model  # noqa: E402

from sparsemoe import moe_layers  # noqa: E402
from sparsemoe.hf.patch import patch_hf_model  # noqa: E402
from sparsemoe.hf.trainer import MoETrainerCallback  # noqa: E402

RATE = 0.01


def _train(tmp_path, bias_update: str, callbacks: list):
    """Two optimizer steps of two micro-batches each, with gradient checkpointing; returns the MoE layers and
    each one's bias move in units of the update rate."""
    torch.manual_seed(0)
    model = tiny_hf_model("deepseek_v3").train()  # DeepSeek-V3 routing: a sigmoid score with a selection bias
    patch_hf_model(model, bias_update=bias_update)
    for layer in moe_layers(model):
        layer.config = dataclasses.replace(layer.config, bias_update_rate=RATE)
    data = [{"input_ids": torch.randint(0, VOCAB, (12,)), "labels": torch.randint(0, VOCAB, (12,))} for _ in range(8)]
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        **{name: True, name + "_kwargs": {"use_reentrant": False}},  # the name changed in transformers 5.2x
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    before = [layer.router.expert_bias.clone() for layer in moe_layers(model)]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    layers = moe_layers(model)
    return layers, [(layer.router.expert_bias - b) / RATE for layer, b in zip(layers, before)]


def test_the_callback_moves_step_biases_once_per_optimizer_step(tmp_path):
    """With bias_update="step" under the Trainer's gradient checkpointing: each expert's bias moves by at
    most one rate step per optimizer step (two here), and the injected aux gradient is scaled to the
    accumulation (1/2)."""
    layers, moves = _train(tmp_path, "step", [MoETrainerCallback()])
    for layer, move in zip(layers, moves):
        assert torch.allclose(move, move.round(), atol=1e-4)
        assert move.abs().max() == pytest.approx(2, abs=1e-4)
        assert layer.aux_loss_scale == 0.5 and not layer.router.pending_load.any()


def test_without_the_callback_step_biases_hold_still(tmp_path):
    layers, moves = _train(tmp_path, "step", [])
    for layer, move in zip(layers, moves):
        assert not move.any() and layer.router.pending_load.any()  # counted, never applied
        assert layer.aux_loss_scale == 1.0


def test_gradient_checkpointing_really_recomputes(tmp_path):
    """The same run with the per-forward bias is refused: the Trainer's checkpointing does recompute."""
    with pytest.raises(RuntimeError, match="bias_update='step'"):
        _train(tmp_path, "forward", [MoETrainerCallback()])
