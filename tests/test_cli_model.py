"""`sparsemoe train` / `generate` / `inspect` end to end, in-process, on the tiny preset, and their errors."""

import json
import re
import shutil

import pytest
import torch

from sparsemoe.cli import main
from sparsemoe.train.checkpoint import MODEL_FILE, resolve_checkpoint
from sparsemoe.train.run import saved_configs

QUICK = [
    "--preset",
    "tiny",
    "--max-bytes",
    "60000",
    "--max-steps",
    "6",
    "--eval-interval",
    "3",
    "--log-interval",
    "2",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *QUICK, "--run-dir", str(path)]) == 0
    return path


def error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sparsemoe {command}: error: "), err
    return err[0]


def test_train_writes_the_run_folder(run_dir):
    for name in ("metrics.jsonl", "config.json", "report.md", "loss.png", "expert_load.png"):
        assert (run_dir / name).exists(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6]
    assert resolve_checkpoint(run_dir).name == "step-000006"


def test_train_resume_extends_the_run(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert (
        main(["train", "--run-dir", str(copy), "--resume", "--max-steps", "8", "--no-progress", "--threads", "1"]) == 0
    )
    assert "resumed" in capsys.readouterr().out
    assert resolve_checkpoint(copy).name == "step-000008"


def test_generate_streams_a_continuation(run_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "def main(",
                "--max-new-tokens",
                "20",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("def main(") and len(out.encode()) >= len("def main(") + 1
    assert re.fullmatch(
        r"20 tokens: the first after [\d.]+ ms \(prompt of 9 tokens\), then [\d.]+ ms per token \(\d+ tokens/s\); "
        r"CPU \(\d+ threads?\)\n",
        captured.err,
    )
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "def main(",
                "--max-new-tokens",
                "20",
                "--temperature",
                "0",
                "--no-cache",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == out


def test_inspect_reports_experts(run_dir, tmp_path, capsys):
    assert main(["inspect", "--checkpoint", str(run_dir), "--windows", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer 0" in out and "expert  3" in out and "bytes:" in out and "words:" in out
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert len(data["share"]) == 2 and sum(data["share"][0]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "inspect.png").stat().st_size > 1000


@pytest.mark.parametrize("command", ["train", "generate", "inspect"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out or command == "train"
    assert "==SUPPRESS==" not in out


def test_every_option_has_help():
    from sparsemoe.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "generate", "inspect"):
        for action in subparsers.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


# --- bad input: one clear line, exit status 2 ------------------------------------------------------------


def test_missing_and_empty_data(tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in error_line(capsys, "train")
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "b"), "--data", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in error_line(capsys, "train")
    (tmp_path / "folder").mkdir()
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "c"), "--data", str(tmp_path / "folder")]) == 2
    assert "no text files" in error_line(capsys, "train")


def test_seq_len_longer_than_the_model(tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--seq-len", "65"]) == 2
    assert "max_seq_len=64" in error_line(capsys, "train")


def test_bad_config_values(tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--set", "top_k=9"]) == 2
    assert "ModelConfig.top_k=9" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--set", "experts=4"]) == 2
    assert "unknown model config field" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--lr", "-1"]) == 2
    assert "TrainConfig.lr" in error_line(capsys, "train")
    assert main(["train", "--preset", "huge"]) == 2
    assert "tiny, demo, wide, gpu, mixtral" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--set", "nope_layers=[0,"]) == 2
    assert "--set value '[0,' is not valid JSON" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "a"), "--set", "nope_layers=[5]"]) == 2
    assert "ModelConfig.nope_layers=[5] is invalid" in error_line(capsys, "train")
    checkpointed = [*QUICK, "--run-dir", str(tmp_path / "a"), "--activation-checkpointing"]
    assert main(["train", *checkpointed, "--set", "bias_balancing=true"]) == 2
    assert "add --set bias_update=step" in error_line(capsys, "train")
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_set_takes_json_lists_and_dicts():
    from sparsemoe.commands.train import parse_overrides

    overrides = parse_overrides(["sliding_layers=[0, 2]", 'rope_scaling={"type": "yarn", "factor": 2.0}'])
    assert overrides == {"sliding_layers": [0, 2], "rope_scaling": {"type": "yarn", "factor": 2.0}}


def test_resume_may_change_training_settings(run_dir, tmp_path, capsys):
    """--set on --resume applies to the run's own config; balancing settings and the backend may change (here to
    per-step bias updates with activation checkpointing), what the model is may not (test_resume_errors)."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    changes = ["--set", "aux_loss_coef=0.02", "--set", "bias_update=step", "--activation-checkpointing"]
    argv = ["train", "--run-dir", str(copy), "--resume", "--max-steps", "8", "--no-progress", "--threads", "1"]
    assert main([*argv, *changes]) == 0
    assert "with changed training settings: aux_loss_coef 0.01 -> 0.02, bias_update 'forward' -> 'step'" in (
        capsys.readouterr().out
    )
    model_cfg, train_cfg, _ = saved_configs(copy)
    assert (model_cfg.aux_loss_coef, model_cfg.bias_update, train_cfg.activation_checkpointing) == (0.02, "step", True)
    assert resolve_checkpoint(copy).name == "step-000008"


def test_resume_errors(run_dir, tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(run_dir)]) == 2
    assert "--resume" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "no checkpoint" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(run_dir), "--resume", "--set", "num_experts=8"]) == 2
    assert "another model config" in error_line(capsys, "train")


def test_bad_checkpoints(run_dir, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in error_line(capsys, "generate")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    model_file = resolve_checkpoint(broken) / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])
    assert main(["generate", "--checkpoint", str(broken)]) == 2
    assert "truncated" in error_line(capsys, "generate")
    assert main(["inspect", "--checkpoint", str(broken)]) == 2
    assert "truncated" in error_line(capsys, "inspect")
    assert main(["generate", "--checkpoint", str(run_dir), "--top-p", "0"]) == 2
    assert "--top-p" in error_line(capsys, "generate")


# --- devices and precision ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("command", ["train", "generate", "inspect", "bench", "profile"])
def test_cuda_without_a_gpu_is_one_line(command, run_dir, tmp_path, capsys):
    argv = {
        "train": ["train", *QUICK, "--run-dir", str(tmp_path / "r")],
        "generate": ["generate", "--checkpoint", str(run_dir)],
        "inspect": ["inspect", "--checkpoint", str(run_dir), "--out", str(tmp_path)],
        "bench": ["bench", "--quick", "--out", str(tmp_path)],
        "profile": ["profile", "--quick", "--out", str(tmp_path)],
    }[command]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "--device 'cuda' was asked for, but no CUDA GPU is available here" in error_line(capsys, command)
    assert not (tmp_path / "r").exists()


def test_a_gpu_index_that_does_not_exist_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r"), "--device", "cuda:2"]) == 2
    assert "'cuda:2' does not exist: there are 2 CUDA GPUs here (cuda:0..cuda:1)" in error_line(capsys, "train")


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sparsemoe.train.memory.free_memory", lambda device: 2**20)
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r")]) == 2
    line = error_line(capsys, "train")
    assert "this run (0.00 B parameters, batch 8 x 32, fp32) needs about" in line and "more than the 1 MiB free" in line
    assert not (tmp_path / "r").exists()


def test_precision_is_a_training_setting_and_bf16_its_alias(tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r"), "--bf16", "--precision", "fp32"]) == 2
    assert "--bf16 and --precision fp32 contradict each other" in error_line(capsys, "train")
    assert main(["train", *QUICK, "--max-steps", "2", "--run-dir", str(tmp_path / "r"), "--bf16"]) == 0
    assert saved_configs(tmp_path / "r")[1].precision == "bf16"
    assert "on CPU (1 thread), bf16; memory needed about" in capsys.readouterr().out
    resume = ["train", "--run-dir", str(tmp_path / "r"), "--resume", "--max-steps", "3", "--no-progress"]
    assert main([*resume, "--precision", "fp32", "--threads", "1"]) == 0
    assert saved_configs(tmp_path / "r")[1].precision == "fp32"


def test_mfu_is_printed_and_reported_given_the_peak(tmp_path, capsys):
    assert main(["train", *QUICK, "--max-steps", "2", "--run-dir", str(tmp_path / "r"), "--peak-tflops", "0.5"]) == 0
    assert re.search(r"\d+ tokens/s \(\d+ in training steps after the first\), MFU \d+\.\d%", capsys.readouterr().out)
    report = (tmp_path / "r" / "report.md").read_text()
    assert re.search(r"\| MFU \(model FLOPs utilisation\) \| [\d.]+% of 0.5 TFLOP/s \|", report)
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "s"), "--peak-tflops", "0"]) == 2
    assert "--peak-tflops 0.0: expected a number > 0" in error_line(capsys, "train")


def test_generate_and_inspect_run_in_bfloat16(run_dir, tmp_path, capsys):
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "def", "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("def")
    inspect = ["inspect", "--checkpoint", str(run_dir), "--windows", "2", "--out", str(tmp_path)]
    assert main([*inspect, "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "inspect.json").exists()


def test_parallel_runs_pair_the_device_with_the_process_group_backend(monkeypatch):
    from sparsemoe.cli import CommandError
    from sparsemoe.commands.train_parallel import dist_backend

    assert dist_backend("cpu", None) == "gloo" and dist_backend("auto", None) is None
    assert dist_backend("auto", "gloo") == "gloo"
    with pytest.raises(CommandError, match="each process takes the GPU of its LOCAL_RANK"):
        dist_backend("cuda:1", None)
    with pytest.raises(CommandError, match="--device cpu runs on gloo, not --dist-backend nccl"):
        dist_backend("cpu", "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CommandError, match="no CUDA GPU is available here"):
        dist_backend("cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist_backend("cuda", None) == "nccl"
