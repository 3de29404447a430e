"""An MoE model against its equal-active dense twin, over several seeds: is the difference bigger than the noise?

One run folder per (model, seed) in the output folder, each a normal run (`run_training`):

    OUT/moe-seed0/  OUT/dense-seed0/  OUT/moe-seed1/ ...   checkpoints, metrics.jsonl, report.md, ...
    OUT/<run>/compare_run.json   that run's numbers as `compare` uses them (written when it finishes)
    OUT/compare-plan.json        what the runs train with (model, training, data), for the checks below
    OUT/compare.json             config, per-run results and the statistics          } written once every
    OUT/compare.md               the table: loss mean +- std over seeds, difference  } run has finished,
    OUT/compare.png              validation loss against step, mean and min..max     } atomically

The MoE model and the dense twin (`ModelConfig.dense_baseline()`: the same active feed-forward parameters
per token) train with the same TrainConfig at each seed, so they see the same batches in the same order;
only `seed` differs between seeds. The seed-to-seed spread is the noise a single pair of runs cannot show.

Resumable: a run folder whose checkpoint is at max_steps is reused, not retrained; one with an earlier
checkpoint is resumed (`resume=True`). An output folder whose runs were trained with another model,
training config or data is refused before anything trains.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from sparsemoe.device import describe_device, resolve_device
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.train.config import TrainConfig
from sparsemoe.train.report import read_metrics
from sparsemoe.train.run import run_exists, run_training, saved_configs
from sparsemoe.train.shards import is_shard_folder
from sparsemoe.train.training_data import DATA_DIR, tokenized_once
from sparsemoe.train.tokenizer import parse_spec

MODELS = ("moe", "dense")
LABELS = {"moe": "MoE", "dense": "dense twin"}
RUN_RESULT, PLAN = "compare_run.json", "compare-plan.json"
OUTPUTS = ("compare.json", "compare.md", "compare.png")
_RUN_NAME = re.compile(r"^(moe|dense)-seed(\d+)$")


class CompareError(ValueError):
    """An output folder or request that `compare` cannot use (runs from another config, too few seeds)."""


class CompareStopped(Exception):
    """A run stopped early on request (Ctrl-C): its checkpoint is saved; the same call again continues."""


# --- statistics -----------------------------------------------------------------------------------------------


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """{"values", "n", "mean", "std"} of one model's per-seed numbers; std is the sample std (ddof=1)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise CompareError(f"a standard deviation over seeds needs at least 2 values, got {len(values)}")
    return {"values": values, "n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values)}


def compare_stats(moe: Sequence[float], dense: Sequence[float]) -> dict[str, Any]:
    """MoE against dense on a lower-is-better number (a loss), values in seed order: each side's
    `seed_stats`, the difference dense - MoE of the means (> 0: MoE is better), the pooled std
    sqrt((s_moe^2 + s_dense^2) / 2), the difference in pooled stds (None when the pooled std is 0), which
    side is better, and the paired view: the per-seed differences dense - MoE (at a seed both models see
    the same batches, so the data order's share of the spread cancels) with their mean and std."""
    a, b = seed_stats(moe), seed_stats(dense)
    difference = b["mean"] - a["mean"]
    pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
    better = "moe" if difference > 0 else "dense" if difference < 0 else "neither"
    return {
        "moe": a,
        "dense": b,
        "difference": difference,
        "pooled_std": pooled,
        "difference_in_std": difference / pooled if pooled > 0 else None,
        "better": better,
        "paired": seed_stats([d - m for m, d in zip(a["values"], b["values"])]),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The statistics of compare.json from the per-run results: validation loss (and bits per byte when every
    run has it), mean training tokens/s per model and their ratio MoE/dense, parameter counts."""
    by = {m: sorted((r for r in runs if r["model"] == m), key=lambda r: r["seed"]) for m in MODELS}
    out: dict[str, Any] = {"val_loss": compare_stats(*[[r["val_loss"] for r in by[m]] for m in MODELS])}
    if all(r.get("val_bpb") is not None for r in runs):
        out["val_bpb"] = compare_stats(*[[r["val_bpb"] for r in by[m]] for m in MODELS])
    speed = {m: _mean_known(r.get("train_tokens_per_s") for r in by[m]) for m in MODELS}
    ratio = speed["moe"] / speed["dense"] if speed["moe"] is not None and speed["dense"] else None
    out["train_tokens_per_s"] = {**speed, "ratio": ratio}
    out["parameters"] = {m: {k: by[m][0][k] for k in ("parameters", "active_parameters")} for m in MODELS}
    return out


def _mean_known(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


# --- one run --------------------------------------------------------------------------------------------------


def run_name(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def run_configs(model_config: ModelConfig, train_config: TrainConfig, seed: int) -> dict[str, tuple]:
    """{"moe": (model config, train config), "dense": (...)} at one seed."""
    train = replace(train_config, seed=seed)
    return {"moe": (model_config, train), "dense": (model_config.dense_baseline(), train)}


def shared_data(
    out_dir: Path, data: Optional[str], tokenizer: Optional[str], max_bytes: Optional[int]
) -> tuple[Optional[str], Optional[str], Optional[int]]:
    """(data, tokenizer, max_bytes) as every run gets them: text with a tokenizer other than bytes is
    tokenized once into OUT/data (by `compare`), which the runs then stream with its own tokenizer."""
    if tokenizer is None or parse_spec(tokenizer)[0] == "bytes" or is_shard_folder(data):
        return data, tokenizer, max_bytes
    return str(out_dir / DATA_DIR), None, None


def check_run(
    run_dir: Path, model_config: ModelConfig, train_config: TrainConfig, max_bytes: Optional[int]
) -> tuple[int, ModelConfig]:
    """(the step of the run's checkpoint, the model config to go on with): (0, model_config) for a run with
    no checkpoint, else the checkpoint's own config. CompareError if it was trained with another model config,
    training config or max_bytes. The vocabulary is left out: run_training gives the model its tokenizer's
    (the tokenizer and data are checked through compare-plan.json)."""
    if not run_exists(run_dir):
        return 0, model_config
    saved_model, saved_train, meta = saved_configs(run_dir)
    diff = {k: v for k, v in saved_model.diff(model_config).items() if k != "vocab_size"}
    given_train = train_config.to_dict()
    diff.update({k: (v, given_train.get(k)) for k, v in saved_train.to_dict().items() if given_train.get(k) != v})
    if meta.get("max_bytes") != max_bytes:
        diff["max_bytes"] = (meta.get("max_bytes"), max_bytes)
    if diff:
        shown = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in list(diff.items())[:4])
        raise CompareError(
            f"run folder {str(run_dir)!r} was trained with another config ({shown}); use another output folder, "
            "or the settings it was trained with"
        )
    return int(meta["step"]), saved_model


def model_sizes(model_config: ModelConfig) -> dict[str, int]:
    """Total and active parameters, from a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = MoETransformer(model_config)
    return {"parameters": model.num_params(), "active_parameters": model.num_active_params()}


def eval_curve(run_dir: Path) -> list[list[float]]:
    """[[step, validation loss], ...] from the run's metrics.jsonl."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [[r["step"], r["val_loss"]] for r in records if r.get("event") == "eval"]


def run_result(model: str, seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    """One run's record in compare.json, from run_training's summary."""
    trained = summary["model"]
    return {
        "name": run_name(model, seed),
        "model": model,
        "seed": seed,
        "step": summary["step"],
        "val_loss": summary["val_loss"],
        "val_bpb": summary.get("val_bpb"),
        **{k: summary.get(k) for k in ("train_tokens_per_s", "tokens_per_s", "seconds", "cpu_seconds")},
        "parameters": trained.num_params(),
        "active_parameters": trained.num_active_params(),
        "device": describe_device(next(trained.parameters()).device),
    }


def rebuilt_result(run_dir: Path, model: str, seed: int, model_config: ModelConfig) -> dict[str, Any]:
    """A finished run's record without its compare_run.json (stopped between its last checkpoint and that
    file): the losses from metrics.jsonl, the sizes from the config; its speed is unknown (None)."""
    evals = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("event") == "eval"]
    if not evals:
        raise CompareError(f"{str(run_dir)!r} is finished but its metrics.jsonl has no validation loss")
    last = evals[-1]
    times = dict.fromkeys(("train_tokens_per_s", "tokens_per_s", "seconds", "cpu_seconds", "device"))
    return {"name": run_name(model, seed), "model": model, "seed": seed, "step": last["step"],
            "val_loss": last["val_loss"], "val_bpb": last.get("val_bpb"), **times,
            **model_sizes(model_config)}  # fmt: skip


def finished_result(run_dir: Path, model: str, seed: int, model_config: ModelConfig, step: int) -> dict[str, Any]:
    """The record of a run that had already finished: its compare_run.json, else rebuilt from its files."""
    path = Path(run_dir) / RUN_RESULT
    if path.exists():
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            if result.get("step") == step:
                return result
        except json.JSONDecodeError:
            pass  # a damaged file: rebuild it below
    return rebuilt_result(run_dir, model, seed, model_config)


def train_one(
    run_dir: Path,
    model: str,
    seed: int,
    configs: tuple[ModelConfig, TrainConfig],
    *,
    data: Optional[str],
    max_bytes: Optional[int],
    log: Callable[[str], None],
    **options: Any,
) -> dict[str, Any]:
    """Reuse, resume or train one run; returns its record (with "reused": True when nothing trained)."""
    step, model_config = check_run(run_dir, *configs, max_bytes)
    train_config = configs[1]
    if step >= train_config.max_steps:
        result = finished_result(run_dir, model, seed, model_config, step)
        log(f"{run_dir.name}: finished earlier, reused (validation loss {result['val_loss']:.4f})")
        return {**result, "reused": True}
    summary = run_training(
        model_config, train_config, run_dir, data=data, resume=step > 0, max_bytes=max_bytes,
        log=lambda line: log(f"{run_dir.name}: {line}"), **options,
    )  # fmt: skip
    if summary["stopped_early"]:
        saved = " (checkpoint saved)" if summary["step"] else ""
        raise CompareStopped(
            f"{run_dir.name} stopped at step {summary['step']} of {train_config.max_steps}{saved}; run the same "
            "command again to continue"
        )
    result = run_result(model, seed, summary)
    write_atomic(run_dir / RUN_RESULT, json.dumps(result, indent=1))
    speed = f"{result['train_tokens_per_s']:.0f} training tokens/s"
    log(f"{run_dir.name}: validation loss {result['val_loss']:.4f} at step {result['step']}, {speed}")
    return {**result, "reused": False}


# --- the whole comparison -------------------------------------------------------------------------------------


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if len(seeds) < 2:
        raise CompareError(f"seeds {seeds}: a standard deviation over seeds needs at least 2 seeds")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds {seeds}: each seed once")
    for seed in seeds:
        TrainConfig(seed=seed)  # the range check (ValueError, one line)
    return seeds


def make_plan(model_config: ModelConfig, train_config: TrainConfig, data: Optional[str], max_bytes: Optional[int],
              tokenizer: Optional[str]) -> dict[str, Any]:  # fmt: skip
    """What every run of an output folder must share: the checked content of compare-plan.json."""
    train = {k: v for k, v in train_config.to_dict().items() if k != "seed"}
    return {
        "model_config": model_config.to_dict(),
        "train_config": train,
        "data": os.path.abspath(data) if data is not None and os.path.exists(data) else data,  # builtin:NAME as is
        "max_bytes": max_bytes,
        "tokenizer": tokenizer,
    }


def check_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """CompareError if the folder's compare-plan.json differs from `plan` (its runs trained otherwise)."""
    path = out_dir / PLAN
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CompareError(f"{str(path)!r} is damaged ({err}); remove it to use the runs as they are") from None
    diff = []
    for part in plan:
        a, b = saved.get(part), plan[part]
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}: runs {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(f"{part}: runs {a!r} vs now {b!r}")
    if diff:
        raise CompareError(
            f"output folder {str(out_dir)!r} holds runs trained with another config ({', '.join(diff[:4])}); use "
            "another output folder, or the settings they were trained with"
        )


def check_folder(out_dir: Path, model_config: ModelConfig, train_config: TrainConfig, plan: dict[str, Any]) -> None:
    """Before anything trains: the plan and every run folder already in `out_dir` must match this comparison."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"output folder {str(out_dir)!r} is a file; choose a folder (created if missing)")
    if not out_dir.is_dir():
        return
    check_plan(out_dir, plan)
    for entry in sorted(out_dir.iterdir()):
        match = _RUN_NAME.match(entry.name)
        if match and entry.is_dir():
            model, seed = match.group(1), int(match.group(2))
            configs = run_configs(model_config, train_config, seed)[model]
            check_run(entry, *configs, plan["max_bytes"])


def compare(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    seeds: Sequence[int],
    *,
    data: Optional[str] = None,
    max_bytes: Optional[int] = None,
    device: Any = "auto",
    tokenizer: Optional[str] = None,
    progress: bool = False,
    setup: Optional[Callable[[Any], None]] = None,
    log: Callable[[str], None] = print,
    describe: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Train `model_config` (an MoE model) and its dense twin at each seed into `out_dir`, reusing finished runs
    and resuming partial ones; write compare.json, compare.md and compare.png; return compare.json's content.

    train_config: shared by every run; its `seed` is replaced by each of `seeds` (at least 2).
    tokenizer: as for run_training; other than bytes, the text is tokenized once into OUT/data for every run.
    setup: called with each run's Trainer before it trains and with None after it (StopOnSignal.attach fits:
        Ctrl-C stops the run after a step and saves; between runs it aborts at once).
    describe: extra entries for compare.json's "config" (e.g. the preset's name and the overrides).
    Raises CompareError (a ValueError) for a folder or request it cannot use, CompareStopped when a run was
    stopped on request, and what run_training raises (DataError, CheckpointError, ValueError).
    """
    if model_config.dense:
        raise CompareError("the model is already dense: compare needs an MoE model to set against its dense twin")
    out_dir, seeds = Path(out_dir), check_seeds(seeds)
    parse_spec(tokenizer)  # a malformed spec fails here, before anything is written
    source = {"data": data, "max_bytes": max_bytes, "tokenizer": tokenizer}
    data, tokenizer, max_bytes = shared_data(out_dir, data, tokenizer, max_bytes)
    options = {"tokenizer": tokenizer, "device": device, "progress": progress}
    plan = {**make_plan(model_config, train_config, data, max_bytes, tokenizer), "source": source}
    check_folder(out_dir, model_config, train_config, plan)
    if data != source["data"]:  # text, tokenized once into OUT/data for every run
        tokenized_once(Path(data), source["data"], source["tokenizer"], train_config.val_fraction, source["max_bytes"], log)
    if setup is not None:
        options["setup"] = setup
    runs = []
    for seed in seeds:  # MoE and dense alternate: an interrupted comparison leaves whole pairs behind
        for model, configs in run_configs(model_config, train_config, seed).items():
            run_dir = out_dir / run_name(model, seed)
            try:
                record = train_one(run_dir, model, seed, configs, data=data, max_bytes=max_bytes, log=log, **options)
                runs.append(record)
            finally:  # stopped or not: once a checkpoint exists, the plan must guard it
                if setup is not None:
                    setup(None)
                if run_exists(run_dir) and not (out_dir / PLAN).exists():
                    write_atomic(out_dir / PLAN, json.dumps(plan, indent=1))
    for run in runs:
        run["curve"] = eval_curve(out_dir / run["name"])
    result = {
        "config": compare_config(train_config, seeds, plan, out_dir, device, describe),
        "runs": runs,
        "summary": summarize(runs),
    }
    write_outputs(out_dir, result)
    return result


def compare_config(train_config: TrainConfig, seeds: list[int], plan: dict[str, Any], out_dir: Path, device: Any,
                   describe: Optional[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """compare.json's "config": what was compared (the models as trained: their vocabulary is the tokenizer's),
    on what data, with what software and machine."""
    moe, _, meta = saved_configs(out_dir / run_name("moe", seeds[0]), verify=False)
    dense, _, _ = saved_configs(out_dir / run_name("dense", seeds[0]), verify=False)
    return {
        **(describe or {}),
        "model_config": moe.to_dict(),
        "dense_config": dense.to_dict(),
        "train_config": {**train_config.to_dict(), "seed": None},
        "seeds": seeds,
        "data": meta.get("data"),
        "max_bytes": plan["max_bytes"],
        "tokenizer": meta.get("tokenizer", {}).get("spec", plan["tokenizer"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": describe_device(resolve_device(device)),
    }


# --- outputs --------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and os.replace: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(out_dir: Path, result: dict[str, Any]) -> list[Path]:
    """compare.png, compare.json and compare.md into out_dir, each atomically; returns their paths."""
    js, md, png = (out_dir / name for name in OUTPUTS)
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    plot_curves(result["runs"], tmp, _title(result))
    os.replace(tmp, png)
    write_atomic(js, json.dumps(result, indent=1))
    write_atomic(md, render_markdown(result))
    return [png, js, md]


def _title(result: dict[str, Any]) -> str:
    config = result["config"]
    name = f"{config['preset']} preset: " if config.get("preset") else ""
    return f"{name}MoE vs dense twin over {len(config['seeds'])} seeds"


def _mean_std(stats: dict[str, Any], digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _count(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n:,.0f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The markdown table and the difference lines (what compare.md holds and the command prints)."""
    summary = result["summary"]
    loss, bpb = summary["val_loss"], summary.get("val_bpb")
    head = "| model | validation loss (mean ± std) | per seed |"
    head += " bits per byte (mean ± std) |" if bpb else ""
    lines = [head + " training tokens/s (mean) | active parameters | total parameters |"]
    lines.append("|---" * (lines[0].count("|") - 1) + "|")
    for model in MODELS:
        per_seed = ", ".join(f"{v:.4f}" for v in loss[model]["values"])
        row = f"| {LABELS[model]} | {_mean_std(loss[model])} | {per_seed} |"
        row += f" {_mean_std(bpb[model])} |" if bpb else ""
        sizes = summary["parameters"][model]
        row += f" {_count(summary['train_tokens_per_s'][model])} | {sizes['active_parameters']:,} |"
        lines.append(row + f" {sizes['parameters']:,} |")
    lines += ["", difference_line(loss, "validation loss")]
    if bpb:
        lines.append(difference_line(bpb, "bits per byte"))
    return lines + [speed_line(summary)]


def difference_line(stats: dict[str, Any], what: str) -> str:
    """"Dense − MoE validation loss: +0.0210; pooled std 0.0070, so 3.00 pooled stds: MoE is better."."""
    text = f"Dense − MoE {what}: {stats['difference']:+.4f}; pooled std {stats['pooled_std']:.4f}"
    if stats["difference_in_std"] is None:
        return text + " (every seed gave the same value: no spread to measure the difference in)."
    better = {"moe": "MoE is better", "dense": "the dense twin is better", "neither": "neither is better"}
    paired = stats["paired"]
    wins = sum(d > 0 for d in paired["values"])
    return text + (
        f", so {abs(stats['difference_in_std']):.2f} pooled stds: {better[stats['better']]}. Paired by seed: "
        f"{_mean_std(paired)} ({', '.join(f'{d:+.4f}' for d in paired['values'])}; MoE lower at {wins} of "
        f"{paired['n']} seeds)."
    )


def speed_line(summary: dict[str, Any]) -> str:
    ratio = summary["train_tokens_per_s"]["ratio"]
    shown = "unknown (a run's speed was not recorded)" if ratio is None else f"{ratio:.2f}"
    return f"Training tokens/s, MoE / dense: {shown}."


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md: what was compared, the table, the differences, the curves."""
    config = result["config"]
    seeds = ", ".join(map(str, config["seeds"]))
    step = max(r["step"] for r in result["runs"])
    lines = [f"# {_title(result)}", ""]
    lines.append(
        f"Final validation loss (cross-entropy per token, at step {step}) of the MoE model and its dense twin (the "
        f"same active parameters per token), each trained with seeds {seeds} on the same data and training "
        "config. Mean ± sample standard deviation (n − 1) over the seeds; training tokens/s from the training "
        "steps after each session's first."
    )
    lines += ["", *table_lines(result), ""]
    lines.append(
        f"Data: {config['data']}; device: {config['device']}; torch {config['torch']}, torch threads: "
        f"{config['threads']}."
    )
    lines += ["", "![validation loss against step](compare.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; files only
    import matplotlib.pyplot as plt

    return plt


def mean_band(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds at the steps every curve has."""
    steps = sorted(set.intersection(*[{s for s, _ in curve} for curve in curves])) if curves else []
    at = [dict((s, v) for s, v in curve) for curve in curves]
    values = [[a[s] for a in at] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss against step: the mean over seeds per model, shaded from the min to the max seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, color in zip(MODELS, ("tab:blue", "tab:orange")):
        steps, mean, low, high = mean_band([r["curve"] for r in runs if r["model"] == model])
        seeds = sum(r["model"] == model for r in runs)
        ax.plot(steps, mean, "o-", color=color, markersize=3, label=f"{LABELS[model]}: mean of {seeds} seeds")
        ax.fill_between(steps, low, high, color=color, alpha=0.2, label=f"{LABELS[model]}: min..max over seeds")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (cross-entropy per token)")
    ax.set_title(f"{title}\nvalidation loss: mean line, band from min to max seed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
