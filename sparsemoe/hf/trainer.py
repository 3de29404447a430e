"""Training a model with sparsemoe layers under transformers' `Trainer` (needs transformers and accelerate).

    from sparsemoe.hf.patch import patch_hf_model
    from sparsemoe.hf.trainer import MoETrainerCallback

    patch_hf_model(model, bias_update="step")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[MoETrainerCallback()])

What the Trainer cannot know about the layers, the callback does:
* the balancing losses' gradient is injected by each layer (aux_loss_mode="inject") once per micro-batch,
  so under gradient accumulation it is scaled by 1/gradient_accumulation_steps (`set_aux_loss_scale`),
  as the Trainer scales the language-model loss: the step's aux gradient is then the micro-batches' mean;
* layers with bias_update="step" move their selection bias after each optimizer step, from the load of
  all that step's micro-batches (`update_expert_biases`); this is what makes the Trainer's gradient
  (activation) checkpointing safe with a selection bias.
"""

from __future__ import annotations

from transformers import TrainerCallback

from sparsemoe.layer import set_aux_loss_scale, update_expert_biases


class MoETrainerCallback(TrainerCallback):
    """Scales the injected balancing gradient to the accumulation and moves step-mode selection biases."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_aux_loss_scale(model, 1.0 / max(1, args.gradient_accumulation_steps))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Called once per optimizer step, after it (not per micro-batch).
        if model is not None:
            update_expert_biases(model)
