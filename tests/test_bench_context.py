"""Benchmarks in context: a layer timed alone or inside a mixed process, and the model-level training benchmark."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemoe.bench.measure import time_alone, time_interleaved
from sparsemoe.bench.report import markdown
from sparsemoe.bench.suite import SuiteOptions, run_suite
from sparsemoe.bench.train_step import TrainBenchOptions, check_train_options, run_train_bench, train_bench_markdown
from sparsemoe.bench.workload import attention_step
from sparsemoe.cli import main


def test_interleaved_timing_runs_the_workload_before_every_call():
    calls = []
    out = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1,
        between=lambda: calls.append("w"),
    )  # fmt: skip
    assert calls == ["w", "a", "w", "b"] + ["w", "a", "w", "b"] * 2
    assert out["a"]["runs"] == 2


def test_alone_timing_runs_each_callable_back_to_back():
    calls = []
    out = time_alone({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a"] * 4 + ["b"] * 4
    assert out["b"]["runs"] == 3 and out["a"]["min_ms"] <= out["a"]["median_ms"]


def test_timings_count_the_page_faults_of_fresh_memory():
    """A call that writes 64 MiB of freshly mapped memory takes at least a fault per 2 MiB page; one reusing a
    buffer takes none."""
    import mmap

    kept = torch.empty(16 * 2**20)
    kept.fill_(1.0)
    ones = b"\x01" * 2**26

    def fresh() -> None:
        with mmap.mmap(-1, len(ones)) as fresh_pages:
            fresh_pages.write(ones)

    def reused() -> None:
        kept.fill_(2.0)

    out = time_alone({"fresh": fresh, "reused": reused}, repeats=3)
    assert out["fresh"]["page_faults"] >= 32
    assert out["reused"]["page_faults"] < 8
    assert out["fresh"]["sys_ms"] >= 0


def test_attention_workload_trains_its_weights():
    step = attention_step(dim=64, tokens=40, dtype=torch.float32, device=torch.device("cpu"))
    params = [c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer)][0]
    before = [p.detach().clone() for group in params.param_groups for p in group["params"]]
    step()
    after = [p.detach() for group in params.param_groups for p in group["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_suite_reports_each_context_in_its_own_section():
    opts = SuiteOptions(
        configs=("tiny",), tokens=(16,), dtypes=("float32",), routings=("random",), repeats=1,
        impls=("sparsemoe grouped", "dense ideal"), contexts=("alone", "mixed"), log=lambda line: None,
    )  # fmt: skip
    result = run_suite(opts)
    alone, mixed = result["cases"]
    assert (alone["context"], mixed["context"]) == ("alone", "mixed")
    assert alone["memory"] and not mixed["memory"]  # memory once per case
    assert set(mixed["timings"]["backward"]["sparsemoe grouped"]) >= {"min_ms", "page_faults", "sys_ms"}
    md = markdown(result, "sparsemoe bench")
    assert "## tiny · float32 · routing random · each alone" in md
    assert "## tiny · float32 · routing random · mixed process" in md
    assert md.count("the kernel's share") == 2


def test_an_unknown_context_is_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="unknown context 'busy'"):
        run_suite(SuiteOptions(configs=("tiny",), contexts=("busy",), log=lambda line: None))
    with pytest.raises(SystemExit):
        main(["bench", "--context", "busy", "--out", str(tmp_path)])
    assert "accepted: interleaved, alone, mixed" in capsys.readouterr().err


def test_training_benchmark_times_the_moe_model_and_its_dense_twin():
    opts = TrainBenchOptions(
        presets=("tiny",), precisions=("fp32", "bf16"), batch_size=2, seq_len=16, repeats=1, warmup=0,
        log=lambda line: None,
    )  # fmt: skip
    result = run_train_bench(opts)
    assert [(c["preset"], c["precision"]) for c in result["cases"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for case in result["cases"]:
        moe, dense = case["models"]["moe"], case["models"]["dense"]
        assert moe["active_parameters"] < moe["parameters"]  # MoE: fewer active than total
        assert dense["active_parameters"] == dense["parameters"]
        assert case["tokens_per_s_ratio"] == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"])
        assert moe["tokens_per_s"] == pytest.approx(32 / moe["ms_per_step"] * 1e3)
    md = train_bench_markdown(result, "sparsemoe bench --train")
    assert "| tiny | fp32 |" in md and "| tiny | bf16 |" in md


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(presets=("huge",)), "unknown model preset 'huge'"),
        (dict(precisions=("fp8",)), "unknown precision 'fp8'"),
        (dict(presets=("tiny",), seq_len=4096), "longer than preset 'tiny'"),
    ],
)
def test_training_benchmark_refuses_bad_options(changes, message):
    with pytest.raises(ValueError, match=message):
        check_train_options(TrainBenchOptions(**changes))


def test_bench_train_command_writes_its_reports(tmp_path, capsys):
    argv = ["bench", "--train", "--presets", "tiny", "--precisions", "fp32", "--repeats", "1", "--batch-size", "2",
            "--seq-len", "16", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    assert result["cases"][0]["preset"] == "tiny"
    assert "MoE / dense" in (tmp_path / "train.md").read_text()
    assert main(["bench", "--train", "--quant", "--out", str(tmp_path)]) == 2
    assert "one at a time" in capsys.readouterr().err
    assert main(["bench", "--train", "--presets", "tiny", "--seq-len", "999", "--out", str(tmp_path / "x")]) == 2
    assert "longer than preset 'tiny'" in capsys.readouterr().err
