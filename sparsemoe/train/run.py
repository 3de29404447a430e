"""One training run end to end, as `sparsemoe train` does it: data, model, optimizer, trainer, report.

Single-process glue over the reusable pieces (`Trainer`, `RandomBatches`, `build_optimizer`); a
parallel launcher builds the same pieces itself, with its own sampler and trainer subclass.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sparsemoe.device import describe_device, resolve_device, resolve_precision
from sparsemoe.device import peak_tflops as peak_device_tflops
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.model.flops import training_flops_per_token
from sparsemoe.train.checkpoint import CheckpointError, has_checkpoint, load_meta, refuse_quantized, resolve_checkpoint
from sparsemoe.train.config import TrainConfig
from sparsemoe.train.data import RandomBatches, check_length, eval_batches, num_tokens
from sparsemoe.train.memory import check_fits, estimate_training_memory
from sparsemoe.train.report import write_report
from sparsemoe.train.tokenizer import TOKENIZER_DIR
from sparsemoe.train.training_data import saved_tokenizer_spec, tokenizer_meta, training_corpus
from sparsemoe.train.trainer import Trainer, build_optimizer, lr_factor


def saved_configs(run_dir: Path, verify: bool = True) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """The model and train configs stored in a run's latest checkpoint (its trainer.json checksum verified)."""
    meta = load_meta(resolve_checkpoint(run_dir), verify)
    refuse_quantized(meta, run_dir)
    try:
        return ModelConfig.from_dict(meta["model_config"]), TrainConfig.from_dict(meta["train_config"]), meta
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint in {str(run_dir)!r} has no usable configuration ({err})") from None


# ModelConfig fields that say how the model is trained, not what it is or computes: a resumed run may change
# them (e.g. to bias_update="step" for activation checkpointing, or a smaller balancing loss).
TRAINING_FIELDS = (
    "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update", "bias_update_rate", "moe_backend"
)  # fmt: skip


def check_same_model(saved: ModelConfig, given: ModelConfig, where: Any) -> str:
    """Raise CheckpointError unless `given` is the checkpoint's model; returns the end of the resume message
    that names its changed training settings (`TRAINING_FIELDS`), "" when none."""
    diff = saved.diff(given)
    other = {k: v for k, v in diff.items() if k not in TRAINING_FIELDS}
    if other:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs given {b!r}" for k, (a, b) in list(other.items())[:4])
        raise CheckpointError(f"checkpoint {str(where)!r} was trained with another model config ({shown})")
    if not diff:
        return ""
    return ", with changed training settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())


def resume_schedule(saved: TrainConfig, given: TrainConfig, step: int) -> tuple[TrainConfig, str]:
    """(the config a resumed run trains with, a note for the log or ""). A run resumed with another max_steps
    keeps its learning-rate schedule (its cosine still ends where it was planned; steps past it run at the
    minimum): changing max_steps alone would move every step's learning rate, the ones already trained
    included. A schedule_steps given on resume re-plans it, and the note says what that does now."""
    planned = saved.schedule_steps or saved.max_steps
    if given.schedule_steps != saved.schedule_steps:  # re-planned on purpose
        end = given.schedule_steps or given.max_steps
        if end == planned:
            return given, ""
        before, after = lr_factor(step, saved) * saved.lr, lr_factor(step, given) * given.lr
        return given, (
            f"the learning-rate schedule now ends at step {end} (planned: {planned}); the learning rate at step "
            f"{step} moves from {before:.3g} to {after:.3g}"
        )
    if given.max_steps == saved.max_steps:
        return given, ""
    kept = replace(given, schedule_steps=planned)
    stretched = lr_factor(step, replace(given, schedule_steps=given.max_steps)) * given.lr
    return kept, (
        f"max_steps {saved.max_steps} -> {given.max_steps}: the learning-rate schedule keeps its cosine ending at "
        f"step {planned} (steps after it train at lr x {given.min_lr_ratio:g}); --schedule-steps "
        f"{given.max_steps} stretches it to the new end instead (the learning rate at step {step} then moves "
        f"from {lr_factor(step, kept) * given.lr:.3g} to {stretched:.3g})"
    )

def fit_vocabulary(
    model_config: ModelConfig, tokenizer: Any, saved: Optional[ModelConfig], where: Any, log: Callable
) -> ModelConfig:
    """The model config with the tokenizer's vocabulary; a resumed run's checkpoint (`saved`) must have it."""
    if saved is not None and saved.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(where)!r} has a vocabulary of {saved.vocab_size:,} tokens, but the tokenizer "
            f"({tokenizer.describe()}) has {tokenizer.vocab_size:,}: resume with the tokenizer the run was trained with"
        )
    if model_config.vocab_size == tokenizer.vocab_size:
        return model_config
    if saved is None:
        log(f"vocab_size {model_config.vocab_size} -> {tokenizer.vocab_size}: the model's vocabulary is the tokenizer's")
    return replace(model_config, vocab_size=tokenizer.vocab_size)


def describe_sizes(model: MoETransformer) -> dict[str, str]:
    return {
        "parameters": f"{model.num_params():,}",
        "active parameters per token": f"{model.num_active_params():,}",
    }


def run_training(
    model_config: ModelConfig,
    train_config: TrainConfig,
    run_dir: Path,
    *,
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    max_bytes: Optional[int] = None,
    log: Callable[[str], None] = print,
    setup: Optional[Callable[[Trainer], None]] = None,
    device: Any = "auto",
    peak_tflops: Optional[float] = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a run in `run_dir`; write checkpoints, metrics and the report there.

    data: a text file, folder, JSONL, builtin:NAME, a token-shard folder, or None (the standard library).
    tokenizer: bytes (the default for text), bpe:N, a tokenizer.json or folder (see `training_corpus`);
    the model's vocab_size is set to the tokenizer's. On resume: the run's own when not given.
    setup: called with the Trainer before training (e.g. to install a signal handler).
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device; a run resumes on any.
    peak_tflops: the device's peak for MFU, where sparsemoe.device does not know it.
    verify: on resume, check the checkpoint's files against their checksums (sparsemoe.train.checkpoint).

    The model is initialised on the CPU from the seed and then moved, so a seed gives the same initial
    weights on every device. Before anything is allocated, the memory the run needs is estimated
    (sparsemoe.train.memory) and a run that cannot fit the device is refused (DeviceError).
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    precision = resolve_precision(train_config.precision, device)
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"seq_len={train_config.seq_len} is longer than the model's max_seq_len={model_config.max_seq_len}; "
            f"use a seq_len of at most {model_config.max_seq_len}"
        )
    changed, schedule_note = "", ""
    saved_model = None
    if resume:
        saved_model, saved_train, saved_meta = saved_configs(run_dir, verify)
        tokenizer = tokenizer if tokenizer is not None else saved_tokenizer_spec(saved_meta, run_dir)
    corpus, tok = training_corpus(data, tokenizer, train_config.val_fraction, max_bytes, run_dir, log)
    check_length(corpus, train_config.seq_len)
    model_config = fit_vocabulary(model_config, tok, saved_model, run_dir, log)
    if resume:
        changed = check_same_model(saved_model, model_config, run_dir)
        train_config, schedule_note = resume_schedule(saved_train, train_config, saved_meta["step"])
    estimate = estimate_training_memory(model_config, train_config, precision)
    size = f"{estimate.parameters / 4e9:.2f} B parameters, batch {train_config.batch_size} x {train_config.seq_len}"
    check_fits(estimate, device, f"this run ({size}, {precision})")

    torch.manual_seed(train_config.seed)
    model = MoETransformer(model_config).to(device)
    optimizer = build_optimizer(model, train_config)
    flops = training_flops_per_token(model, train_config.seq_len)
    peak = peak_tflops or peak_device_tflops(device, precision)
    train_batches = RandomBatches(corpus.train, train_config.batch_size, train_config.seq_len, seed=train_config.seed)
    val = eval_batches(corpus.val, train_config.batch_size, train_config.seq_len, train_config.eval_batches)
    meta = {
        "model_config": model_config.to_dict(), "data": corpus.source, "max_bytes": max_bytes,
        "tokenizer": tokenizer_meta(tok), "data_source": data, "shards": corpus.shards,
    }  # fmt: skip
    trainer = Trainer(
        model, optimizer, train_config, train_batches, val, run_dir, meta=meta, progress=progress,
        device=device, flops_per_token=flops, peak_tflops=peak, tokens_per_byte=corpus.tokens_per_byte,
    )  # fmt: skip
    if resume:
        trainer.resume(run_dir, verify)
        log(f"resumed {run_dir} at step {trainer.step}{changed}")
        if schedule_note:
            log(schedule_note)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / TOKENIZER_DIR)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), "data": corpus.source,
                "tokenizer": tokenizer_meta(tok),
            },
            indent=1,
        ),
        encoding="utf-8",
    )  # fmt: skip
    kind = (
        "dense baseline" if model_config.dense else f"MoE {model_config.num_experts} experts, top-{model_config.top_k}"
    )
    log(
        f"{kind}: {model.num_params():,} parameters, {model.num_active_params():,} active per token; "
        f"data {corpus.source}: {num_tokens(corpus.train):,} train / {num_tokens(corpus.val):,} validation tokens "
        f"({tok.describe()}) from {corpus.num_files} file(s)"
        + (f" ({corpus.skipped} binary or non-UTF-8 file(s) skipped)" if corpus.skipped else "")
        + f"; run folder {run_dir}"
    )
    log(f"on {describe_device(device)}, {precision}; memory needed {estimate.describe()}")
    if setup is not None:
        setup(trainer)
    summary = trainer.fit()
    rows = {
        "model": kind,
        **describe_sizes(model),
        "data": f"{corpus.source} ({num_tokens(corpus.train):,} train tokens, {corpus.tokens_per_byte:.3f} per byte)",
        "tokenizer": tok.describe(),
        "steps": f"{summary['step']} of {train_config.max_steps}",
        "tokens per step": f"{train_config.tokens_per_step:,}",
        "wall time this session": f"{summary['seconds']:.0f} s for {summary['steps_this_session']} steps",
        "CPU time this session (all threads)": f"{summary['cpu_seconds']:.0f} s",
        "throughput this session (tokens/s)": f"{summary['tokens_per_s']:.0f}",
        "training steps after the first (tokens/s)": f"{summary['train_tokens_per_s']:.0f}",
        "model FLOPs per token (training)": f"{flops / 1e9:.3f} GFLOP" if flops >= 1e8 else f"{flops / 1e6:.2f} MFLOP",
        **performance_rows(summary, peak),
        "device / precision": f"{describe_device(device)} / {precision}",
        "memory estimate": estimate.describe(),
        "torch / threads": f"{torch.__version__} / {torch.get_num_threads()}",
    }
    report = write_report(run_dir, {"title": f"{run_dir.name} ({kind})", "rows": rows}, model_config.moe_layer_ids)
    summary["report"] = str(report)
    summary["model"] = model
    return summary


def performance_rows(summary: dict[str, Any], peak_tflops: Optional[float]) -> dict[str, str]:
    """Report rows for MFU and peak memory, where the run measured them."""
    rows = {}
    if "mfu" in summary:
        rows["MFU (model FLOPs utilisation)"] = f"{summary['mfu']:.1%} of {peak_tflops:g} TFLOP/s"
    if "peak_memory_bytes" in summary:
        rows["peak memory allocated"] = f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"
    return rows


def run_exists(run_dir: Path) -> bool:
    return has_checkpoint(run_dir)
