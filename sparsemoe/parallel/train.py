"""Data + expert parallel training of the MoE language model with the project's trainer, under torchrun.

`run_parallel_training` is what `sparsemoe train-parallel` runs on every rank
(`torchrun --standalone --nproc-per-node 4 -m sparsemoe train-parallel --ep-size 2 --preset tiny`),
with every option of `sparsemoe train` plus --ep-size / --dist-backend / --dist-timeout. The W
processes split each global batch of --batch-size sequences into W equal slices (the same sequences a
single process would draw, so losses match the single-process run), experts are sharded over groups
of --ep-size consecutive ranks, and gradients are averaged as DistributedDataParallel would.
Checkpoints hold full, unsharded tensors written by rank 0 (model and optimizer state) plus the data
position, in the format of `sparsemoe train`: a run trained on 4 processes resumes on 1 (with
`sparsemoe train --resume`) or on any other world size (with `train-parallel`), and the other way round.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from sparsemoe.layer import moe_layers
from sparsemoe.parallel.comm import collective
from sparsemoe.parallel.groups import ParallelGroups
from sparsemoe.parallel.shard import broadcast_model, shard_experts
from sparsemoe.parallel.state import (
    clip_grad_norm,
    full_optimizer_state,
    full_state_dict,
    local_state_dict,
    shard_optimizer_state,
    sync_gradients,
)
from sparsemoe.train.checkpoint import load_model_state, save_checkpoint
from sparsemoe.train.signals import StopOnSignal
from sparsemoe.train.trainer import Trainer


class GlobalBatchSlices:
    """Each rank's slice of the global batch a single process would draw (same sampler, same seed).

    Every rank draws the whole global batch (cheap: byte windows) and keeps rows
    [rank * B/W, (rank + 1) * B/W). The sampler state is the single-process one, so checkpoints resume
    on any world size at the same position in the data.
    """

    def __init__(self, batches, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        inputs, targets = next(self.batches)
        return self._slice(inputs), self._slice(targets)

    def _slice(self, t: Tensor) -> Tensor:
        per_rank = t.shape[0] // self.world_size
        return t[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


class ParallelTrainer(Trainer):
    """The project's `Trainer` across W processes, through its seams and the optimizer's hooks.

    * gradients: averaged over ranks (`sync_gradients`) and clipped to the global norm in an optimizer
      step pre-hook, i.e. after backward and before the update; the base class's own clipping is off
      because it would see only this rank's expert shards.
    * metrics: averaged over ranks; only rank 0 writes files and shows progress.
    * checkpoints: full tensors gathered from every rank, written by rank 0; loaded by every rank and
      cut to its shard (model by `local_state_dict`, optimizer by a load_state_dict pre-hook).
    * stop requests (Ctrl-C, SIGTERM) are agreed on by all ranks each step, so they stop together.
    """

    def __init__(self, model, optimizer, config, train_batches, val_batches, run_dir=None, *, groups: ParallelGroups, **kwargs):
        self.groups = groups
        self.full_config = config
        main = groups.rank == 0
        kwargs["progress"] = kwargs.get("progress", True) and main
        super().__init__(model, optimizer, replace(config, grad_clip=0.0), train_batches, val_batches, run_dir, is_main=main, **kwargs)
        self._grad_norm: Optional[float] = None
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        optimizer.register_load_state_dict_pre_hook(lambda opt, state: shard_optimizer_state(opt, self.model, state))

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        sync_gradients(self.model, self.groups)
        if self.full_config.grad_clip > 0:
            self._grad_norm = clip_grad_norm(self.model, self.full_config.grad_clip, self.groups)

    def train_step(self) -> dict[str, Any]:
        self._grad_norm = None
        out = super().train_step()
        out["grad_norm"] = self._grad_norm
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        with collective("all-reduce of the stop flag", None):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flag.item())
        return out

    def reduce_metrics(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
        if not keys:
            return values
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        with collective("all-reduce of metrics", None):
            dist.all_reduce(t)
        return {**values, **{k: float(v) / self.groups.world_size for k, v in zip(keys, t.tolist())}}

    def model_state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(self.model, self.groups)

    def load_model_state(self, state: dict[str, Tensor], where: Any) -> None:
        load_model_state(self.model, local_state_dict(self.model, state), where)

    def save(self) -> Optional[Path]:
        if self.run_dir is None:
            return None
        model_state = self.model_state_dict()  # collective: every rank takes part
        optimizer_state = full_optimizer_state(self.optimizer, self.model)  # collective
        path = None
        if self.is_main:
            meta = dict(self.meta, train_config=self.full_config.to_dict())
            path = save_checkpoint(
                self.run_dir / "checkpoints", self.step, model_state, optimizer_state, meta, self.rng_states()
            )
        with collective("barrier after a checkpoint", None):
            dist.barrier()  # nobody runs ahead (or exits) while rank 0 is still writing
        return path


def slice_batches(batches: list[tuple[Tensor, Tensor]], rank: int, world_size: int) -> list[tuple[Tensor, Tensor]]:
    """This rank's rows of each (fixed) validation batch."""
    out = []
    for inputs, targets in batches:
        per_rank = inputs.shape[0] // world_size
        out.append((inputs[rank * per_rank : (rank + 1) * per_rank], targets[rank * per_rank : (rank + 1) * per_rank]))
    return out


def run_parallel_training(
    model_config,
    train_config,
    run_dir: Path,
    groups: ParallelGroups,
    *,
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    max_bytes: Optional[int] = None,
    log: Callable[[str], None] = print,
    peak_tflops: Optional[float] = None,
    verify: bool = True,
) -> dict[str, Any]:
    """`sparsemoe.train.run.run_training` across the ranks of `groups` (every rank calls it).

    peak_tflops: one device's peak, for MFU where sparsemoe.device does not know it (MFU is over all W).
    verify: on resume, check the checkpoint's files against their checksums.
    """
    from sparsemoe.device import peak_tflops as peak_device_tflops
    from sparsemoe.device import resolve_precision
    from sparsemoe.model import MoETransformer
    from sparsemoe.model.flops import training_flops_per_token
    from sparsemoe.train.data import RandomBatches, check_length, eval_batches
    from sparsemoe.train.report import write_report
    from sparsemoe.train.run import (
        check_same_model, describe_sizes, fit_vocabulary, performance_rows, resume_schedule, saved_configs,
    )  # fmt: skip
    from sparsemoe.train.training_data import saved_tokenizer_spec, tokenizer_meta, training_corpus
    from sparsemoe.train.tokenizer import TOKENIZER_DIR
    from sparsemoe.train.trainer import build_optimizer

    W, rank = groups.world_size, groups.rank
    if train_config.batch_size % W:
        raise ValueError(
            f"--batch-size {train_config.batch_size} (the global batch) must be divisible by the {W} processes; "
            f"use a multiple of {W}"
        )
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len={train_config.seq_len} is longer than the model's max_seq_len={model_config.max_seq_len}")
    run_dir = Path(run_dir)
    changed, schedule_note, saved_model = "", "", None
    if resume:
        saved_model, saved_train, saved_meta = saved_configs(run_dir, verify)
        tokenizer = tokenizer if tokenizer is not None else saved_tokenizer_spec(saved_meta, run_dir)
    # Rank 0 tokenizes the corpus into RUN/data where it has to; the other ranks then open what it wrote.
    # A failure there reaches every rank (instead of leaving them waiting for rank 0).
    corpus_args = (data, tokenizer, train_config.val_fraction, max_bytes, run_dir)
    failure: list[Optional[str]] = [None]
    error: Optional[ValueError] = None
    if rank == 0:
        try:
            corpus, tok = training_corpus(*corpus_args, log=log)
        except ValueError as err:  # DataError, CheckpointError and the configs' errors
            error, failure = err, [str(err)]
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise ValueError(failure[0])
    if rank != 0:
        corpus, tok = training_corpus(*corpus_args, log=lambda _: None)
    check_length(corpus, train_config.seq_len)
    model_config = fit_vocabulary(model_config, tok, saved_model, run_dir, log if rank == 0 else lambda _: None)
    if resume:
        changed = check_same_model(saved_model, model_config, run_dir)
        train_config, schedule_note = resume_schedule(saved_train, train_config, saved_meta["step"])

    torch.manual_seed(train_config.seed)
    model = MoETransformer(model_config)
    if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only: place the model before sharding
        model.cuda()
    if moe_layers(model):
        shard_experts(model, groups)
    elif groups.ep_size == 1:
        broadcast_model(model)  # a dense model: plain data parallelism
    else:
        raise ValueError(f"--ep-size {groups.ep_size} needs MoE layers; this model is dense (use --ep-size 1)")
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, train_config)
    with torch.device("meta"):  # the whole model's sizes and FLOPs: this rank holds a shard of its experts
        whole = MoETransformer(model_config)
    flops = training_flops_per_token(whole, train_config.seq_len)
    peak = peak_tflops or peak_device_tflops(device, resolve_precision(train_config.precision, device))
    B, S = train_config.batch_size, train_config.seq_len
    train_batches = GlobalBatchSlices(RandomBatches(corpus.train, B, S, seed=train_config.seed), rank, W)
    val = slice_batches(eval_batches(corpus.val, B, S, train_config.eval_batches), rank, W)
    meta = {
        "model_config": model_config.to_dict(),
        "data": corpus.source,
        "max_bytes": max_bytes,
        "tokenizer": tokenizer_meta(tok),
        "data_source": data,
        "shards": corpus.shards,
        "parallel": {"world_size": W, "ep_size": groups.ep_size},
    }
    trainer = ParallelTrainer(
        model, optimizer, train_config, train_batches, val, run_dir, groups=groups, meta=meta, progress=progress,
        device=device, flops_per_token=flops, peak_tflops=peak * W if peak else None,
        tokens_per_byte=corpus.tokens_per_byte,
    )
    if resume:
        trainer.resume(run_dir, verify)
        if rank == 0:
            log(f"resumed {run_dir} at step {trainer.step} on {W} processes{changed}")
            if schedule_note:
                log(schedule_note)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(run_dir / TOKENIZER_DIR)
        config = {
            "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), "data": corpus.source,
            "tokenizer": tokenizer_meta(tok),
        }  # fmt: skip
        (run_dir / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        log(
            f"{W} processes, expert-parallel size {groups.ep_size} ({_plural(groups.num_replicas, 'copy', 'copies')} "
            f"of each expert shard), {dist.get_backend()}; global batch {B} sequences ({B // W} per process); "
            f"run folder {run_dir}"
        )
    with StopOnSignal(trainer, announce=rank == 0):
        summary = trainer.fit()
    if rank == 0:
        rows = {
            "model": f"MoE {model_config.num_experts} experts, top-{model_config.top_k}",
            **describe_sizes(whole),
            "processes": f"{W} ({dist.get_backend()}), expert-parallel size {groups.ep_size}",
            "steps": f"{summary['step']} of {train_config.max_steps}",
            "tokens per step (global)": f"{train_config.tokens_per_step:,}",
            "throughput this session (tokens/s, all processes)": f"{summary['tokens_per_s']:.0f}",
            **performance_rows(summary, peak * W if peak else None),
            "torch / threads per process": f"{torch.__version__} / {torch.get_num_threads()}",
        }
        title = f"{run_dir.name} ({W} processes, ep {groups.ep_size})"
        summary["report"] = str(write_report(run_dir, {"title": title, "rows": rows}, model_config.moe_layer_ids))
    return summary


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
