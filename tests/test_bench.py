"""The benchmark harness: routings, like-for-like implementations, memory measurement, reports, CLI smoke runs."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemoe.bench.configs import BENCH_CONFIGS, make_routing
from sparsemoe.bench.impls import build_impls, make_case
from sparsemoe.bench.measure import peak_memory_bytes, time_interleaved
from sparsemoe.bench.report import markdown
from sparsemoe.cli import main


def test_routings_have_k_distinct_experts_normalised_weights_and_the_intended_balance():
    T, E, K = 512, 8, 2
    loads = {}
    for kind in ("balanced", "random", "skewed"):
        ids, w = make_routing(kind, T, E, K)
        assert ids.shape == (T, K) and w.shape == (T, K)
        assert torch.all(ids.sort(dim=1).values[:, 1:] != ids.sort(dim=1).values[:, :-1])  # distinct per token
        torch.testing.assert_close(w.sum(1), torch.ones(T))
        counts = torch.bincount(ids.reshape(-1), minlength=E).float()
        loads[kind] = (counts.max() / counts.mean()).item()
    assert loads["balanced"] == 1.0
    assert loads["skewed"] > 1.5 * loads["random"]
    with pytest.raises(ValueError, match="accepted: balanced, random, skewed"):
        make_routing("uniform", T, E, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_implementation_computes_the_same_expert_stage(dtype):
    """The comparison is like for like: ours, Hugging Face's and plain torch._grouped_mm agree."""
    cfg = BENCH_CONFIGS["tiny"]
    ids, w = make_routing("skewed", 12, cfg.num_experts, cfg.top_k)
    case = make_case(cfg, 12, dtype, torch.device("cpu"), "skewed", ids, w)
    impls, _ = build_impls(case)
    outputs = {i.name: i.forward().detach().float() for i in impls if i.name != "dense ideal"}
    expected = outputs.pop("sparsemoe reference")
    assert {"sparsemoe auto", "sparsemoe grouped", "sparsemoe decode", "sparsemoe grouped +recompute"} <= set(outputs)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, y in outputs.items():
        err = (y - expected).abs().max().item()
        assert err <= tol * (1 + expected.abs().max().item()), f"{name}: max error {err}"
    dense = next(i for i in impls if i.name == "dense ideal").forward()
    assert dense.shape == (12 * cfg.top_k, cfg.dim)  # T*K rows, same FLOPs


def test_small_batches_can_be_timed_forward_only():
    from sparsemoe.bench.suite import SuiteOptions, run_suite

    opts = SuiteOptions(configs=("tiny",), tokens=(2, 32), dtypes=("float32",), routings=("random",), repeats=1,
                        impls=("sparsemoe grouped", "dense ideal"), backward_min_tokens=16, log=lambda line: None)  # fmt: skip
    result = run_suite(opts)
    small, large = result["cases"]
    assert set(small["timings"]) == {"forward"} and not small["memory"]
    assert "| sparsemoe grouped | – | " in markdown(result, "sparsemoe bench")  # no forward+backward at T=2
    assert set(large["timings"]) == {"forward", "backward"} and set(large["memory"]) == {"sparsemoe grouped", "dense ideal"}


def test_only_the_selected_implementations_are_built():
    cfg = BENCH_CONFIGS["tiny"]
    ids, w = make_routing("random", 4, cfg.num_experts, cfg.top_k)
    case = make_case(cfg, 4, torch.float32, torch.device("cpu"), "random", ids, w)
    wanted = {"sparsemoe grouped", "dense ideal", "hf grouped_mm"}
    impls, skipped = build_impls(case, wanted=wanted.__contains__)
    assert {i.name for i in impls} == wanted and not skipped


def test_an_implementation_that_computes_something_else_is_flagged(monkeypatch):
    """Outputs are checked against the oracle before timing: a wrong one is named in the report."""
    from sparsemoe.bench import suite
    from sparsemoe.bench.impls import Impl

    def with_a_wrong_one(case, with_recompute=True, wanted=lambda name: True):
        impls, skipped = build_impls(case, with_recompute, wanted)
        grouped = next(i for i in impls if i.name == "sparsemoe grouped")
        return impls + [Impl("off by 1%", lambda: grouped.forward() * 1.01, grouped.leaves)], skipped

    monkeypatch.setattr(suite, "build_impls", with_a_wrong_one)
    names = suite.implementation_names()
    monkeypatch.setattr(suite, "implementation_names", lambda: (*names, "off by 1%"))
    opts = suite.SuiteOptions(configs=("tiny",), tokens=(16,), dtypes=("float32",), routings=("random",),
                              impls=("sparsemoe grouped", "sparsemoe reference", "off by 1%"), repeats=1,
                              memory=False, recompute=False, log=lambda line: None)  # fmt: skip
    result = suite.run_suite(opts)
    agreement = result["cases"][0]["agreement"]
    assert agreement["oracle"] == "sparsemoe reference"
    assert agreement["max_rel_error"]["sparsemoe grouped"] < 1e-5
    assert 0.005 < agreement["max_rel_error"]["off by 1%"] < 0.02
    md = markdown(result, "sparsemoe bench")
    assert "**`off by 1%`'s output differs from `sparsemoe reference`'s**" in md
    assert "`sparsemoe grouped`'s output differs" not in md


def test_peak_memory_sees_a_known_allocation():
    n = 1 << 20  # 4 MiB of float32

    def fn():
        a = torch.ones(n)
        b = a * 2  # both live: 8 MiB peak
        del a, b

    peak = peak_memory_bytes(fn)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_time_interleaved_reports_min_and_median():
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved rounds
    assert set(out) == {"a", "b"} and out["a"]["runs"] == 3
    assert out["a"]["min_ms"] <= out["a"]["median_ms"]


def test_markdown_gives_ratios_to_dense_and_the_weight_read_bound():
    case = {
        "config": "tiny", "tokens": 16, "dtype": "float32", "routing": "random", "weight_read_ms": 0.5,
        "notes": {"sparsemoe auto": "decode"}, "skipped": {}, "errors": {"hf grouped_mm": "RuntimeError: x"},
        "timings": {"forward": {"sparsemoe auto": {"min_ms": 1.0}, "dense ideal": {"min_ms": 0.5}}},
        "memory": {"sparsemoe auto": {"peak_mb": 3.0, "grads_mb": 1.0}, "dense ideal": {"peak_mb": 2.0, "grads_mb": 0.0}},
    }
    env = {"torch": "x", "python": "3", "threads": 2, "device": "cpu", "device_name": "cpu", "cpu_count": 2}
    md = markdown({"environment": env, "copy_bandwidth_gbs": 10.0, "cases": [case]}, "sparsemoe bench")
    assert "| sparsemoe auto | 1.00 (0.50) |" in md
    assert "| weight-read bound | 0.500 (auto reaches 0.50) |" in md
    assert "3.0 / 2.0 (1.50 / 1.00)" in md
    assert "`sparsemoe auto` chose `decode`" in md and "`hf grouped_mm` failed" in md


def test_bench_quick_smoke(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    names = set(result["cases"][0]["timings"]["backward"])
    assert {"sparsemoe auto", "dense ideal", "hf grouped_mm", "hf eager", "torch._grouped_mm"} <= names
    assert result["environment"]["threads"] == torch.get_num_threads()
    md = (tmp_path / "bench.md").read_text()
    assert "k and capacity-factor sweep" in md and "Router only" in md
    assert (tmp_path / "bench_tiny_float32_random.png").stat().st_size > 0
    assert list(tmp_path.glob("utilisation_k*_*.png"))
    # Whole Hugging Face blocks, transformers' own and patched by sparsemoe (outputs checked to agree).
    block = json.loads((tmp_path / "hf_block.json").read_text())
    impls = {row["impl"] for row in block["rows"]}
    assert impls == {"hf eager", "hf grouped_mm", "hf patched (sparsemoe auto)"}
    assert {row["mode"] for row in block["rows"]} == {"forward", "forward+backward"}
    assert "Hugging Face Mixtral block" in md


def test_profile_quick_smoke(tmp_path):
    assert main(["profile", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    stages = result["stages"]
    for stage in ("router", "plan", "permute", "gemm_in", "activation", "gemm_out", "combine", "backward gemm_in"):
        assert stages[stage] > 0, stage
    assert result["peak_memory_mb"] > 0
    assert (tmp_path / "profile.png").exists() and "| stage |" in (tmp_path / "profile.md").read_text()


def test_profile_labels_the_native_small_batch_stage(tmp_path):
    """A few rows per expert: the fused op's forward and backward are each one native call, labelled as such."""
    from sparsemoe.ops import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("native CPU kernels unavailable")
    assert main(["profile", "--config", "tiny", "--tokens", "16", "--steps", "1", "--out", str(tmp_path)]) == 0
    stages = json.loads((tmp_path / "profile.json").read_text())["stages"]
    assert stages["native"] > 0 and stages["backward native"] > 0 and "gemm_in" not in stages


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--device", "cuda:0"], "cuda"),
        (["bench", "--gpu"], "--gpu needs a CUDA GPU"),
        (["bench", "--gpu", "--quick"], "two different presets"),
        (["profile", "--backend", "nope"], "--backend 'nope' is not available"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path):
    if ("cuda" in argv[-1] or argv == ["bench", "--gpu"]) and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, want",
    [
        (["--quick"], dict(configs=("tiny",), tokens=(1, 16, 128), repeats=1, recompute=True)),
        (["--quick", "--tokens", "4", "--repeats", "2"], dict(configs=("tiny",), tokens=(4,), repeats=2)),
        (["--tokens", "8"], dict(configs=("mixtral-mini", "fine-grained"), tokens=(8,), repeats=5, impls=None)),
        (["--backward-min-tokens", "64"], dict(backward_min_tokens=64, recompute=True)),
    ],
)
def test_presets_fill_only_the_options_not_given(argv, want, monkeypatch, tmp_path):
    from sparsemoe.bench import suite

    seen = {}

    class Stop(Exception):
        pass

    def capture(opts):
        seen.update(opts.__dict__)
        raise Stop

    monkeypatch.setattr(suite, "run_suite", capture)
    with pytest.raises(Stop):
        main(["bench", *argv, "--out", str(tmp_path)])
    assert {k: seen[k] for k in want} == want


def test_the_gpu_preset_covers_full_size_shapes_decode_and_the_peers():
    from sparsemoe.commands.bench import GPU

    assert {BENCH_CONFIGS[c].dim for c in GPU["configs"]} == {4096}
    assert (BENCH_CONFIGS["mixtral-8x7b"].hidden_dim, BENCH_CONFIGS["mixtral-8x7b"].num_experts) == (14336, 8)
    assert (BENCH_CONFIGS["fine-grained-xl"].num_experts, BENCH_CONFIGS["fine-grained-xl"].top_k) == (128, 8)
    assert GPU["tokens"] == (1, 16, 64, 16384) and GPU["dtypes"] == ("bfloat16",)
    assert 64 < GPU["backward_min_tokens"] <= 16384  # decode sizes forward only, the large batch both
    assert {"sparsemoe triton", "dense ideal", "torch._grouped_mm", "hf grouped_mm"} <= set(GPU["impls"])


def test_bad_list_arguments_name_what_is_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--configs", "huge"])
    assert "accepted: mixtral-mini, fine-grained, mixtral-1k, tiny, mixtral-8x7b, fine-grained-xl" in capsys.readouterr().err


def test_comm_flag_calls_the_comm_report_with_the_output_folder(tmp_path, monkeypatch):
    from sparsemoe.parallel import comm_report

    calls = []
    monkeypatch.setattr(comm_report, "run_comm_report", lambda out_dir, quick=False: calls.append((out_dir, quick)) or {})
    argv = ["bench", "--quick", "--no-plots", "--no-memory", "--impls", "dense ideal", "--comm", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert calls == [(str(tmp_path), True)]


def test_comm_flag_without_the_module_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sparsemoe.parallel.comm_report", None)  # import now raises ImportError
    argv = ["bench", "--quick", "--no-plots", "--no-memory", "--impls", "dense ideal", "--comm", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--comm needs sparsemoe.parallel.comm_report" in err and len(err.splitlines()) == 1
