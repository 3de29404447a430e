"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, validation, checkpoints.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from sparsemoe.layer import moe_layers, set_aux_loss_scale, update_expert_biases
from sparsemoe.train.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
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
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
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
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.meta = dict(meta or {})  # saved into every checkpoint (model_config, data source, ...)
        self.progress = progress
        self.is_main = is_main
        self.device = device
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
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `accum_steps` micro-batches; returns this step's numbers."""
        cfg = self.config
        self.model.train()
        factor = lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor * group.get("lr_mult", 1.0)
        set_aux_loss_scale(self.model, 1.0 / cfg.accum_steps)
        layers = moe_layers(self.model)
        loss_sum = aux_sum = 0.0
        imbalance = 0.0
        load = [torch.zeros(layer.config.num_experts) for layer in layers]
        for _ in range(cfg.accum_steps):
            inputs, targets = next(self.train_batches)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                out = self.forward_model(inputs, targets)
            # Inject mode: aux_loss is detached, adding it changes only the number; return mode: it is the graph.
            ((out.loss + out.aux_loss) / cfg.accum_steps).backward()
            loss_sum += out.loss.item()
            aux_sum += out.aux_loss.item()
            for i, layer in enumerate(layers):
                if layer.stats is not None:
                    load[i] += layer.stats.tokens_per_expert.cpu()
                    imbalance += layer.stats.load_imbalance.item()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        update_expert_biases(self.model)  # bias_update="step": once per step, from all its micro-batches
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": loss_sum / cfg.accum_steps,
            "aux_loss": aux_sum / cfg.accum_steps,
            "load_imbalance": imbalance / (cfg.accum_steps * len(layers)) if layers else None,
            "expert_load": [x.tolist() for x in load],
            "grad_norm": grad_norm,
            "lr": cfg.lr * factor,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.val_batches:
            with self._autocast():
                out = self.forward_model(inputs.to(self.device), targets.to(self.device))
            total += out.loss.item() * inputs.numel()
            count += inputs.numel()
        self.model.train(was_training)
        values = self.reduce_metrics({"val_loss": total / max(count, 1)})
        values["val_ppl"] = math.exp(min(values["val_loss"], 50.0))
        return values

    # --- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until max_steps (or a stop request); returns a summary of the run."""
        cfg = self.config
        bar = self._progress_bar()
        window: list[dict[str, Any]] = []
        window_start = time.perf_counter()
        started, start_step = time.perf_counter(), self.step
        cpu_started = time.process_time()  # on a shared machine CPU time says more than wall time
        last_val: Optional[dict[str, float]] = None
        try:
            while self.step < cfg.max_steps and not self.stop_requested:
                window.append(self.train_step())
                if bar is not None:
                    bar.update(1)
                at_end = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or at_end or self.stop_requested:
                    elapsed = time.perf_counter() - window_start
                    record = self._log_record(window, elapsed)
                    self.metrics.write(record)  # a no-op log on non-main ranks (no path)
                    self._postfix(bar, record)
                    for hook in self.on_log:
                        hook(record)
                    window, window_start = [], time.perf_counter()
                if self.step % cfg.eval_interval == 0 or at_end:
                    last_val = self.evaluate()
                    self.metrics.write({"event": "eval", "step": self.step, **last_val})
                if self.step % cfg.checkpoint_interval == 0 or at_end or self.stop_requested:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - started
        steps = self.step - start_step
        return {
            "step": self.step,
            "steps_this_session": steps,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_started,
            "tokens_per_s": steps * cfg.tokens_per_step / seconds if seconds > 0 else 0.0,
            "stopped_early": self.step < cfg.max_steps,
            **(last_val or {}),
        }

    def _log_record(self, window: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
        n = len(window)
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
            "tokens_per_s": n * self.config.tokens_per_step / elapsed if elapsed > 0 else None,
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
        bar.set_postfix(post, refresh=True)

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        if self.run_dir is None or not self.is_main:
            return None
        rng = {"torch": torch.get_rng_state()}
        if hasattr(self.train_batches, "state_dict"):
            rng.update({f"data.{k}": v for k, v in self.train_batches.state_dict().items()})
        meta = dict(self.meta, train_config=self.config.to_dict())
        return save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model_state_dict(), self.optimizer.state_dict(), meta, rng
        )

    def resume(self, path: Any) -> dict[str, Any]:
        """Restore model, optimizer, step, RNG and data position from a checkpoint; returns its meta."""
        ckpt = load_checkpoint(path)
        self.load_model_state(ckpt["model"], ckpt["dir"])
        if ckpt["optimizer"] is None:
            raise CheckpointError(f"checkpoint {str(ckpt['dir'])!r} has no optimizer state; it cannot be resumed")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {str(ckpt['dir'])!r}: optimizer state does not match ({err})") from None
        rng = ckpt["rng"]
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        data_state = {k[5:]: v for k, v in rng.items() if k.startswith("data.")}
        if data_state and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(data_state)
        self.step = int(ckpt["meta"]["step"])
        self.metrics.truncate_after(self.step)
        return ckpt["meta"]
