"""`sparsemoe compare`: the MoE model against its dense twin over seeds; statistics, files, reuse, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import replace

import pytest

import sparsemoe.train.compare as compare_module
from sparsemoe.cli import main
from sparsemoe.model import preset
from sparsemoe.train import TRAIN_PRESETS, TrainConfig
from sparsemoe.train.checkpoint import resolve_checkpoint
from sparsemoe.train.compare import (
    CompareError,
    CompareStopped,
    compare,
    compare_stats,
    difference_line,
    render_markdown,
    seed_stats,
)
from sparsemoe.train.report import read_metrics

SEEDS = [0, 1]
MAX_BYTES = 12_000
TRAIN = dict(max_steps=4, eval_interval=2, batch_size=2, seq_len=16, log_interval=2, checkpoint_interval=2)
QUICK = ["--preset", "tiny", "--max-bytes", str(MAX_BYTES), "--max-steps", "4", "--eval-interval", "2",
         "--batch-size", "2", "--seq-len", "16", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.py"
    path.write_text("".join(f"def f{i}(x, y):\n    return x * {i % 13} + y - {i % 7}\n\n" for i in range(600)))
    return path


def configs():
    return preset("tiny"), TrainConfig(**{**TRAIN_PRESETS["tiny"], **TRAIN})


def run_compare(out, corpus_file, **kwargs):
    model_cfg, train_cfg = configs()
    return compare(model_cfg, train_cfg, out, SEEDS, data=str(corpus_file), max_bytes=MAX_BYTES, log=lambda _: None,
                   device="cpu", describe={"preset": "tiny"}, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("compare") / "out"
    return out, run_compare(out, corpus_file)


def count_training(monkeypatch):
    """Wrap run_training as compare calls it; returns the list of (run folder name, resume) per call."""
    calls, real = [], compare_module.run_training

    def counted(model_config, train_config, run_dir, **kwargs):
        calls.append((run_dir.name, kwargs["resume"]))
        return real(model_config, train_config, run_dir, **kwargs)

    monkeypatch.setattr(compare_module, "run_training", counted)
    return calls


# --- statistics -----------------------------------------------------------------------------------------------


def test_statistics_on_hand_computed_numbers():
    stats = compare_stats([1.0, 1.2, 1.4], [1.5, 1.5, 1.8])
    assert stats["moe"]["mean"] == pytest.approx(1.2) and stats["moe"]["std"] == pytest.approx(0.2)  # ddof=1
    assert stats["dense"]["mean"] == pytest.approx(1.6) and stats["dense"]["std"] == pytest.approx(math.sqrt(0.03))
    assert stats["difference"] == pytest.approx(0.4)
    assert stats["pooled_std"] == pytest.approx(math.sqrt(0.035))
    assert stats["difference_in_std"] == pytest.approx(0.4 / math.sqrt(0.035))
    assert stats["better"] == "moe" and "MoE is better" in difference_line(stats, "loss")
    assert stats["paired"]["values"] == pytest.approx([0.5, 0.3, 0.4])
    assert stats["paired"]["mean"] == pytest.approx(0.4) and stats["paired"]["std"] == pytest.approx(0.1)
    assert "MoE lower at 3 of 3 seeds" in difference_line(stats, "loss")
    assert compare_stats([2.0, 2.2], [1.0, 1.2])["better"] == "dense"


def test_no_spread_is_said_not_divided_by():
    stats = compare_stats([1.0, 1.0], [2.0, 2.0])
    assert stats["pooled_std"] == 0 and stats["difference_in_std"] is None
    assert "same value" in difference_line(stats, "loss")
    with pytest.raises(CompareError, match="at least 2"):
        seed_stats([1.0])


def synthetic_runs(bpb: bool, speed: bool) -> list[dict]:
    runs = []
    for model, base in (("moe", 2.0), ("dense", 2.1)):
        for seed in SEEDS:
            loss = base + 0.01 * seed
            runs.append({"name": f"{model}-seed{seed}", "model": model, "seed": seed, "step": 4, "val_loss": loss,
                         "val_bpb": loss / math.log(2) if bpb else None, "train_tokens_per_s": 100.0 if speed else None,
                         "parameters": 10, "active_parameters": 5, "curve": [[2, loss + 1], [4, loss]]})  # fmt: skip
    return runs


def test_the_table_shows_bits_per_byte_where_every_run_has_it():
    config = {"seeds": SEEDS, "data": "x", "device": "cpu", "torch": "2", "threads": 1}
    for bpb, speed in ((True, True), (False, False)):
        runs = synthetic_runs(bpb, speed)
        summary = compare_module.summarize(runs)
        md = render_markdown({"config": config, "runs": runs, "summary": summary})
        assert ("bits per byte" in md) == bpb == ("val_bpb" in summary)
        assert ("MoE / dense: 1.00" in md) == speed and ("unknown" in md) != speed
    assert summary["val_loss"]["difference"] == pytest.approx(0.1)


# --- the library function -------------------------------------------------------------------------------------


def test_summary_is_the_statistics_of_the_runs(compared):
    out, result = compared
    assert [(r["model"], r["seed"]) for r in result["runs"]] == [("moe", 0), ("dense", 0), ("moe", 1), ("dense", 1)]
    losses = {}
    for run in result["runs"]:
        evals = [r for r in read_metrics(out / run["name"] / "metrics.jsonl") if r.get("event") == "eval"]
        assert run["val_loss"] == evals[-1]["val_loss"] and run["step"] == evals[-1]["step"] == 4
        assert run["curve"] == [[r["step"], r["val_loss"]] for r in evals]
        losses.setdefault(run["model"], []).append(run["val_loss"])
    loss = result["summary"]["val_loss"]
    for model in ("moe", "dense"):
        assert loss[model]["values"] == losses[model]
        assert loss[model]["mean"] == pytest.approx(statistics.mean(losses[model]))
        assert loss[model]["std"] == pytest.approx(statistics.stdev(losses[model]))
    pooled = math.sqrt((statistics.stdev(losses["moe"]) ** 2 + statistics.stdev(losses["dense"]) ** 2) / 2)
    difference = statistics.mean(losses["dense"]) - statistics.mean(losses["moe"])
    assert loss["pooled_std"] == pytest.approx(pooled) and loss["difference"] == pytest.approx(difference)
    assert loss["difference_in_std"] == pytest.approx(difference / pooled)
    speed = result["summary"]["train_tokens_per_s"]
    means = {m: statistics.mean(r["train_tokens_per_s"] for r in result["runs"] if r["model"] == m) for m in losses}
    assert speed["ratio"] == pytest.approx(means["moe"] / means["dense"])
    sizes = result["summary"]["parameters"]
    assert sizes["dense"]["parameters"] == sizes["dense"]["active_parameters"] < sizes["moe"]["parameters"]


def test_the_files_are_written(compared):
    out, result = compared
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "compare.md").read_text()
    assert md == render_markdown(result)
    assert "| MoE | " in md and "| dense twin | " in md and "pooled std" in md and "MoE / dense" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in result["runs"]:
        assert resolve_checkpoint(out / run["name"]).name == "step-000004"
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    config = result["config"]
    assert config["seeds"] == SEEDS and config["preset"] == "tiny" and config["data"] == str(config["data"])
    assert config["train_config"]["max_steps"] == 4 and config["torch"] and config["threads"] >= 1


def test_a_rerun_reuses_the_finished_runs(compared, corpus_file, monkeypatch):
    out, first = compared
    calls = count_training(monkeypatch)
    metrics = {r["name"]: (out / r["name"] / "metrics.jsonl").read_bytes() for r in first["runs"]}
    again = run_compare(out, corpus_file)
    assert calls == [] and all(r["reused"] for r in again["runs"])
    assert {r["name"]: (out / r["name"] / "metrics.jsonl").read_bytes() for r in first["runs"]} == metrics
    assert again["summary"] == first["summary"]


def test_a_finished_run_without_its_result_file_is_rebuilt(compared, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(compared[0], out)
    (out / "dense-seed1" / compare_module.RUN_RESULT).unlink()
    calls = count_training(monkeypatch)
    again = run_compare(out, corpus_file)
    assert calls == []
    rebuilt = again["runs"][-1]
    assert rebuilt["val_loss"] == compared[1]["runs"][-1]["val_loss"] and rebuilt["train_tokens_per_s"] is None
    assert rebuilt["parameters"] == compared[1]["runs"][-1]["parameters"]


def test_a_stopped_comparison_continues_where_it_stopped(compared, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def stop_after_a_log(trainer):  # what Ctrl-C does: the run stops after its step and saves a checkpoint
        if trainer is not None:
            trainer.on_log.append(lambda record: setattr(trainer, "stop_requested", True))

    with pytest.raises(CompareStopped, match="moe-seed0 stopped at step 2 of 4 .checkpoint saved"):
        run_compare(out, corpus_file, setup=stop_after_a_log)
    assert resolve_checkpoint(out / "moe-seed0").name == "step-000002" and (out / compare_module.PLAN).exists()
    assert not (out / "compare.json").exists()
    calls = count_training(monkeypatch)
    result = run_compare(out, corpus_file)
    assert calls == [("moe-seed0", True), ("dense-seed0", False), ("moe-seed1", False), ("dense-seed1", False)]
    assert [r["val_loss"] for r in result["runs"]] == [r["val_loss"] for r in compared[1]["runs"]]  # exact resume


def test_a_folder_trained_otherwise_is_refused(compared, corpus_file, tmp_path):
    model_cfg, train_cfg = configs()
    out = tmp_path / "copy"
    shutil.copytree(compared[0], out)
    with pytest.raises(CompareError, match="another config .*max_steps: runs 4 vs now 6"):
        compare(model_cfg, replace(train_cfg, max_steps=6), out, SEEDS, data=str(corpus_file), max_bytes=MAX_BYTES)
    (out / compare_module.PLAN).unlink()  # the runs' own checkpoints are checked too
    refused = "run folder .*-seed0. was trained with another config .num_experts: run 4 vs now 8"
    with pytest.raises(CompareError, match=refused):
        compare(replace(model_cfg, num_experts=8), train_cfg, out, SEEDS, data=str(corpus_file), max_bytes=MAX_BYTES)
    with pytest.raises(CompareError, match="already dense"):
        compare(model_cfg.dense_baseline(), train_cfg, tmp_path / "x", SEEDS)


def test_a_bpe_comparison_tokenizes_once_for_every_run(corpus_file, tmp_path, monkeypatch):
    import sparsemoe.train.training_data as data_module

    prepared = []
    real = data_module.prepare_data
    monkeypatch.setattr(data_module, "prepare_data", lambda *a, **k: prepared.append(a) or real(*a, **k))
    out = tmp_path / "bpe"
    result = run_compare(out, corpus_file, tokenizer="bpe:300")
    assert len(prepared) == 1 and (out / "data" / "index.json").is_file()
    assert result["config"]["tokenizer"] == "bpe:300" and result["config"]["model_config"]["vocab_size"] == 300
    assert "val_bpb" in result["summary"]
    run_compare(out, corpus_file, tokenizer="bpe:300")  # everything reused: nothing prepared again
    assert len(prepared) == 1
    with pytest.raises(CompareError, match="another config"):
        run_compare(out, corpus_file, tokenizer="bpe:400")


# --- the command ----------------------------------------------------------------------------------------------


def test_the_command_end_to_end(corpus_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", *QUICK, "--seed-list", "3,5", "--data", str(corpus_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| MoE | " in printed and "| dense twin | " in printed and "pooled std" in printed
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["dense-seed3", "dense-seed5", "moe-seed3", "moe-seed5"]
    result = json.loads((out / "compare.json").read_text())
    assert result["config"]["seeds"] == [3, 5] and result["config"]["preset"] == "tiny"
    assert (out / "compare.md").exists() and (out / "compare.png").exists()


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sparsemoe compare: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "1"], "at least 2 seeds"),
        (["--seed-list", "4"], "at least two different seeds"),
        (["--seed-list", "1,x"], "integers separated by commas"),
        (["--preset", "nope"], "--preset 'nope' is unknown"),
        (["--set", "dense=true"], "needs an MoE model"),
        (["--lr", "-1"], "TrainConfig.lr"),
    ],
)
def test_command_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_training_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert main(["compare", *QUICK, "--data", str(tmp_path / "missing.txt"), "--out", out]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main(["compare", *QUICK, "--tokenizer", "bpe:1", "--out", out]) == 2
    assert "bpe:N" in one_error_line(capsys)


def test_help_says_what_is_computed(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("pooled", "sample standard deviation", "dense twin", "compare.json", "--seed-list"):
        assert words in text, words
