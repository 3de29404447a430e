"""Training hyperparameters: one flat dataclass, validated on construction, and per-preset defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from sparsemoe.device import PRECISIONS


MAX_SEED = 2**63 - 1  # torch's generators take a 64-bit signed seed


@dataclass
class TrainConfig:
    max_steps: int = 600  # optimizer steps; >= 1
    batch_size: int = 16  # sequences per micro-batch; >= 1
    seq_len: int = 256  # tokens per sequence; 1..model max_seq_len
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation); >= 1
    lr: float = 3e-3  # peak learning rate; > 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio; [0, 1]
    warmup_steps: int = 50  # linear warmup steps; >= 0
    schedule_steps: Optional[int] = None  # the step where the cosine decay ends (None: max_steps); later steps
    #                                       run at lr * min_lr_ratio; >= 1 (a resumed, extended run keeps its own)
    weight_decay: float = 0.1  # AdamW decay on matrices (never on norms, biases); >= 0
    beta1: float = 0.9  # AdamW beta1; [0, 1)
    beta2: float = 0.95  # AdamW beta2; [0, 1)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    expert_lr_mult: float = 1.0  # routed-expert parameters train at lr * this; > 0
    eval_interval: int = 100  # validate every n steps (and at the end); >= 1
    eval_batches: int = 8  # validation batches (a fixed set of windows); >= 1
    log_interval: int = 10  # one metrics line per n steps; >= 1
    checkpoint_interval: int = 200  # save every n steps (and at the end); >= 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16: autocast of the forward,
    #                          weights and AdamW float32 either way (sparsemoe.device)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory,
    #                                         about one more forward of compute; bias balancing: bias_update='step'
    seed: int = 0  # model init, data order, dropout; 0 .. 2**63 - 1
    val_fraction: float = 0.05  # share of the corpus held out for validation; (0, 1)

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "seq_len",
            "accum_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
        ):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        if self.schedule_steps is not None:
            _int_at_least("schedule_steps", self.schedule_steps, 1)
        _int_at_least("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise ValueError(f"TrainConfig.seed={self.seed} is invalid: expected an integer from 0 to {MAX_SEED}")
        _in_range("lr", self.lr, 0, math.inf, low_open=True)
        _in_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        _in_range("weight_decay", self.weight_decay, 0, math.inf)
        _in_range("beta1", self.beta1, 0, 1, high_open=True)
        _in_range("beta2", self.beta2, 0, 1, high_open=True)
        _in_range("grad_clip", self.grad_clip, 0, math.inf)
        _in_range("expert_lr_mult", self.expert_lr_mult, 0, math.inf, low_open=True)
        _in_range("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainConfig.precision={self.precision!r} is invalid: expected one of {', '.join(PRECISIONS)} "
                "(float16 would need loss scaling; bf16 trains without it)"
            )
        for name in ("compile", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected True or False")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.accum_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "bf16" in data and "precision" not in data:  # checkpoints from before `precision`: a bf16 flag
            values["precision"] = "bf16" if data["bf16"] else "fp32"
        return cls(**values)


# Defaults per model preset: "demo" takes about 3.5 minutes on two CPU cores (measured, docs/training.md);
# "gpu" is sized for one GPU.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        max_steps=40,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=20,
        eval_batches=2,
        log_interval=5,
        checkpoint_interval=20,
    ),
    "demo": dict(),
    "wide": dict(max_steps=300, lr=2e-3),
    # 16 x 2048 = 32,768 tokens per step, about 40 GiB under bf16 autocast (sparsemoe.train.memory)
    "gpu": dict(
        max_steps=1000,
        batch_size=16,
        seq_len=2048,
        lr=1e-3,
        warmup_steps=100,
        eval_interval=250,
        eval_batches=8,
        log_interval=10,
        checkpoint_interval=500,
    ),
    "mixtral": dict(max_steps=10, batch_size=1, seq_len=128, eval_interval=10, eval_batches=1, log_interval=1),
}


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected an integer >= {low}")


def _in_range(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        ok = ok and not math.isinf(value)
    if not ok:
        if math.isinf(high):  # infinity itself is never accepted: say "finite"
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = "a number in " + ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected {expected}")
