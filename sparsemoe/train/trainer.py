"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, validation, checkpoints.

Device and precision (sparsemoe.device): the model and optimizer arrive on the trainer's device; the
batches come from the host, pinned and copied without blocking on CUDA; the forward runs under the
precision's autocast. A step syncs with the device once, at its end, to read its numbers for the log.

The `Trainer` takes a built model, optimizer and data iterators, so data- or expert-parallel training
can wrap or subclass it from outside: the seams are `reduce_metrics` (average logged numbers across
ranks), `is_main` (only the main process writes metrics, checkpoints and the progress bar),
`model_state_dict` / `load_model_state` (gather or shard the weights), and the data sampler's
`state_dict` (per-rank data position). Nothing below assumes a single process except these defaults.

Losses under gradient accumulation over n micro-batches: each micro-batch backpropagates
(loss + aux_loss) / n, and the MoE layers' injected auxiliary gradient is scaled by 1/n
(`set_aux_loss_scale`), so both aux_loss modes give the gradient of the mean over micro-batches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from sparsemoe.device import autocast, configure_matmuls, resolve_precision
from sparsemoe.layer import moe_layers, set_aux_loss_scale, update_expert_biases
from sparsemoe.train.checkpoint import (
    CheckpointError, load_checkpoint, load_model_state, refuse_quantized, save_checkpoint,
)  # fmt: skip
from sparsemoe.train.config import TrainConfig


def _checkpoint_activations(model: nn.Module) -> None:
    """Turn on the model's activation checkpointing (its ValueError says what the config must change)."""
    if not hasattr(model, "set_activation_checkpointing"):
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no set_activation_checkpointing()")
    model.set_activation_checkpointing(True)


def _compiled(model: nn.Module, checkpointed: bool) -> Callable:
    """torch.compile(model); with checkpointed blocks, traced under the one setting that allows them.

    The compiler refuses side effects in checkpointed code unless they need not be replayed in the
    recomputation, and the MoE layers' (statistics, losses, load counts) belong to the first forward.
    """
    compiled = torch.compile(model)
    if not checkpointed:
        return compiled

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args, **kwargs)

    return forward


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then a cosine that ends
    at `schedule_steps` (max_steps when unset) at min_lr_ratio, which holds after it."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, (cfg.schedule_steps or cfg.max_steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three groups: matrices (decayed), norms/biases (not decayed), routed experts (lr mult)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "experts": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".ffn.experts." in name:
            groups["experts"].append(param)
        elif param.dim() < 2:
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    settings = {
        "decay": (cfg.weight_decay, 1.0),
        "no_decay": (0.0, 1.0),
        "experts": (cfg.weight_decay, cfg.expert_lr_mult),
    }
    param_groups = [
        {"params": params, "name": name, "weight_decay": settings[name][0], "lr_mult": settings[name][1]}
        for name, params in groups.items()
        if params
    ]
    # fused: one kernel for the whole update, on CUDA and on the CPU (50 M float32 parameters, 2 threads:
    # 25 ms a step against 94 ms for the default for-each implementation, which makes several passes over
    # memory; an MoE model has E/k times its dense twin's feed-forward parameters, so this matters more to it)
    devices = {p.device.type for group in param_groups for p in group["params"]}
    fused = True if devices and devices <= {"cpu", "cuda"} else None
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# Optimizer settings that say how the update is computed on this device, not what it computes: a
# checkpoint's values are replaced by the running optimizer's on resume (a checkpoint of another
# implementation, e.g. an older for-each run, resumes with this one's, and the other way round).
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


def adopt_implementation_flags(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`state` (an optimizer state dict) with the implementation flags of `optimizer`'s groups."""
    groups = [
        {**saved, **{k: now[k] for k in _IMPLEMENTATION_FLAGS if k in now}}
        for saved, now in zip(state["param_groups"], optimizer.param_groups)
    ]
    return {**state, "param_groups": groups + state["param_groups"][len(groups) :]}


class MetricsLog:
    """JSON lines, one object per record, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records that a killed run wrote after its last checkpoint."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.records = kept


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        train_batches: Iterator[tuple[Tensor, Tensor]],
        val_batches: Iterable[tuple[Tensor, Tensor]],
        run_dir: Optional[Path] = None,
        *,
        meta: Optional[dict[str, Any]] = None,
        progress: bool = True,
        is_main: bool = True,
        device: Any = None,
        flops_per_token: Optional[float] = None,
        peak_tflops: Optional[float] = None,
        tokens_per_byte: Optional[float] = None,
    ) -> None:
        """device: where the model and optimizer are, batches are moved there (default: the model's).
        flops_per_token: model FLOPs of one training token (sparsemoe.model.flops); with `peak_tflops`,
        the device's peak, the log records MFU.
        tokens_per_byte: validation tokens per byte of their text (1 for bytes); given, each evaluation
        also reports bits per byte, val_bpb = val_loss * tokens_per_byte / ln 2, which compares across
        tokenizers."""
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.meta = dict(meta or {})  # saved into every checkpoint (model_config, data source, ...)
        self.progress = progress
        self.is_main = is_main
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(config.precision, self.device)
        configure_matmuls(self.device, self.precision)
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.tokens_per_byte = tokens_per_byte
        self.step = 0  # optimizer steps done
        self.stop_requested = False  # set from a signal handler: stop after the current step
        if config.activation_checkpointing:
            _checkpoint_activations(model)
        self.forward_model = _compiled(model, config.activation_checkpointing) if config.compile else model
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir and is_main else None)
        self.on_log: list[Callable[[dict[str, Any]], None]] = []
        if self.run_dir is not None and is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # --- seams for parallel training ---------------------------------------------------------------
    def reduce_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged values across processes (single process: unchanged)."""
        return values

    def model_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Tensor], where: Any) -> None:
        load_model_state(self.model, state, where)

    # --- one step ------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.precision)

    def _to_device(self, batch: Tensor) -> Tensor:
        """A host batch on the trainer's device: through pinned memory without blocking on CUDA."""
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `accum_steps` micro-batches; returns this step's numbers."""
        cfg = self.config
        self.model.train()
        factor = lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor * group.get("lr_mult", 1.0)
        set_aux_loss_scale(self.model, 1.0 / cfg.accum_steps)
        layers = moe_layers(self.model)
        # Summed on the device over the micro-batches, read once at the end (one sync per step).
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, aux_loss, load imbalance
        load = [torch.zeros(layer.config.num_experts, device=self.device) for layer in layers]
        for _ in range(cfg.accum_steps):
            inputs, targets = next(self.train_batches)
            inputs, targets = self._to_device(inputs), self._to_device(targets)
            with self._autocast():
                out = self.forward_model(inputs, targets)
            # Inject mode: aux_loss is detached, adding it changes only the number; return mode: it is the graph.
            ((out.loss + out.aux_loss) / cfg.accum_steps).backward()
            sums[0] += out.loss.detach().double()
            sums[1] += out.aux_loss.detach().double()
            for i, layer in enumerate(layers):
                if layer.stats is not None:
                    load[i] += layer.stats.tokens_per_expert.to(self.device)
                    sums[2] += layer.stats.load_imbalance.to(self.device)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).reshape(1).float()
        self.optimizer.step()
        update_expert_biases(self.model)  # bias_update="step": once per step, from all its micro-batches
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        numbers = torch.cat([sums, *([grad_norm.to(self.device)] if grad_norm is not None else []), *load])
        numbers = numbers.cpu()  # the step's one device-to-host sync: the numbers of the log
        (loss, aux, imbalance), rest = numbers[:3].tolist(), numbers[3:]
        if grad_norm is not None:
            grad_norm, rest = float(rest[0]), rest[1:]
        return {
            "loss": loss / cfg.accum_steps,
            "aux_loss": aux / cfg.accum_steps,
            "load_imbalance": imbalance / (cfg.accum_steps * len(layers)) if layers else None,
            "expert_load": [x.tolist() for x in rest.split([len(x) for x in load])],
            "grad_norm": grad_norm,
            "lr": cfg.lr * factor,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for inputs, targets in self.val_batches:
            with self._autocast():
                out = self.forward_model(self._to_device(inputs), self._to_device(targets))
            total += out.loss.double() * inputs.numel()
            count += inputs.numel()
        self.model.train(was_training)
        values = self.reduce_metrics({"val_loss": total.item() / max(count, 1)})
        values["val_ppl"] = math.exp(min(values["val_loss"], 50.0))
        if self.tokens_per_byte:
            values["val_bpb"] = values["val_loss"] * self.tokens_per_byte / math.log(2)
        return values

    # --- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until max_steps (or a stop request); returns a summary of the run.

        Throughput: `tokens_per_s` over the whole session (validation, checkpoints and the first step's
        compilation or autotuning included); `train_tokens_per_s` over the training steps after the
        session's first; `mfu` from it where the trainer knows the FLOPs per token and the device's peak;
        `peak_memory_bytes` on CUDA (what the caching allocator handed out at most).
        """
        cfg = self.config
        bar = self._progress_bar()
        window: list[dict[str, Any]] = []
        window_seconds = 0.0
        step_seconds: list[float] = []
        started, start_step = time.perf_counter(), self.step
        cpu_started = time.process_time()  # on a shared machine CPU time says more than wall time
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        last_val: Optional[dict[str, float]] = None
        # Records past the step training starts from belong to a run that was killed before it saved them
        # (a resume has already dropped them; a fresh start in a folder whose first save was interrupted
        # drops them here), so no step appears twice.
        self.metrics.truncate_after(self.step)
        try:
            while self.step < cfg.max_steps and not self.stop_requested:
                step_start = time.perf_counter()
                window.append(self.train_step())  # ends with a sync: the time is the device's too
                step_seconds.append(time.perf_counter() - step_start)
                window_seconds += step_seconds[-1]
                if bar is not None:
                    bar.update(1)
                at_end = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or at_end or self.stop_requested:
                    record = self._log_record(window, window_seconds)
                    self.metrics.write(record)  # a no-op log on non-main ranks (no path)
                    self._postfix(bar, record)
                    for hook in self.on_log:
                        hook(record)
                    window, window_seconds = [], 0.0
                if self.step % cfg.eval_interval == 0 or at_end:
                    last_val = self.evaluate()
                    self.metrics.write({"event": "eval", "step": self.step, **last_val})
                    last_val["val_step"] = self.step  # for the summary: which step the loss is from
                if self.step % cfg.checkpoint_interval == 0 or at_end or self.stop_requested:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - started
        steps = self.step - start_step
        steady = step_seconds[1:] or step_seconds  # the first step compiles, autotunes, warms the allocator
        train_tokens_per_s = len(steady) * cfg.tokens_per_step / sum(steady) if sum(steady) > 0 else 0.0
        summary = {
            "step": self.step,
            "steps_this_session": steps,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_started,
            "tokens_per_s": steps * cfg.tokens_per_step / seconds if seconds > 0 else 0.0,
            "train_tokens_per_s": train_tokens_per_s,
            "stopped_early": self.step < cfg.max_steps,
            **(last_val or {}),
        }
        mfu = self.mfu(train_tokens_per_s)
        if mfu is not None:
            summary["mfu"] = mfu
        if self.device.type == "cuda":
            summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return summary

    def mfu(self, tokens_per_s: Optional[float]) -> Optional[float]:
        """Model FLOPs utilisation at this throughput: tokens/s * FLOPs per token / peak; None if unknown."""
        if not tokens_per_s or not self.flops_per_token or not self.peak_tflops:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_tflops * 1e12)

    def _log_record(self, window: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
        """The log line of a window of steps; `elapsed`: the seconds its training steps took."""
        n = len(window)
        tokens_per_s = n * self.config.tokens_per_step / elapsed if elapsed > 0 else None
        mfu = self.mfu(tokens_per_s)
        values = {
            "loss": sum(w["loss"] for w in window) / n,
            "aux_loss": sum(w["aux_loss"] for w in window) / n,
        }
        if window[0]["load_imbalance"] is not None:
            values["load_imbalance"] = sum(w["load_imbalance"] for w in window) / n
        values = self.reduce_metrics(values)
        layers = len(window[0]["expert_load"])
        load = []
        for i in range(layers):
            counts = torch.tensor([w["expert_load"][i] for w in window]).sum(0)
            load.append((counts / counts.sum().clamp_min(1)).tolist())
        norms = [w["grad_norm"] for w in window if w["grad_norm"] is not None]
        return {
            "event": "train",
            "step": self.step,
            "lr": window[-1]["lr"],
            **values,
            "grad_norm": sum(norms) / len(norms) if norms else None,
            "tokens_per_s": tokens_per_s,
            **({"mfu": mfu} if mfu is not None else {}),
            "expert_load": load,
        }

    def _progress_bar(self):
        if not (self.progress and self.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _postfix(bar, record: dict[str, Any]) -> None:
        if bar is None:
            return
        post = {"loss": f"{record['loss']:.3f}", "aux": f"{record['aux_loss']:.4f}"}
        if "load_imbalance" in record:
            post["imb"] = f"{record['load_imbalance']:.2f}"
        if record.get("tokens_per_s"):
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if record.get("mfu") is not None:
            post["mfu"] = f"{record['mfu']:.0%}"
        bar.set_postfix(post, refresh=True)

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        if self.run_dir is None or not self.is_main:
            return None
        meta = dict(self.meta, train_config=self.config.to_dict())
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.model_state_dict(),
            self.optimizer.state_dict(),
            meta,
            self.rng_states(),
        )

    def rng_states(self) -> dict[str, Tensor]:
        """What a resumed run needs to draw the same numbers: torch's CPU generator, on CUDA the device's
        generator (dropout and router noise run there), and the data sampler's position."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if hasattr(self.train_batches, "state_dict"):
            rng.update({f"data.{k}": v for k, v in self.train_batches.state_dict().items()})
        return rng

    def resume(self, path: Any, verify: bool = True) -> dict[str, Any]:
        """Restore model, optimizer, step, RNG and data position from a checkpoint; returns its meta.
        verify: check the checkpoint's files against their checksums first."""
        ckpt = load_checkpoint(path, verify=verify)
        refuse_quantized(ckpt["meta"], ckpt["dir"])
        self.load_model_state(ckpt["model"], ckpt["dir"])
        if ckpt["optimizer"] is None:
            raise CheckpointError(f"checkpoint {str(ckpt['dir'])!r} has no optimizer state; it cannot be resumed")
        try:
            self.optimizer.load_state_dict(adopt_implementation_flags(ckpt["optimizer"], self.optimizer))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {str(ckpt['dir'])!r}: optimizer state does not match ({err})") from None
        rng = ckpt["rng"]
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":  # a CPU run's checkpoint has none: the seed's stands
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        data_state = {k[5:]: v for k, v in rng.items() if k.startswith("data.")}
        if data_state and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(data_state)
        self.step = int(ckpt["meta"]["step"])
        self.metrics.truncate_after(self.step)
        return ckpt["meta"]
