"""Nothing silently wrong: checksummed checkpoints, one-line errors for bad checkpoints, data and arguments,
signals counted, run folders kept consistent; and a fuzz of every numeric and path option of the commands."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemoe import MoE, MoEConfig
from sparsemoe.cli import main
from sparsemoe.train.checkpoint import CHECKSUMS, META_FILE, MODEL_FILE, resolve_checkpoint
from sparsemoe.train.data import load_corpus
from sparsemoe.train.signals import StopOnSignal

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "tiny", "--max-bytes", "40000", "--max-steps", "4", "--warmup-steps", "1", "--eval-interval", "2",
         "--log-interval", "1", "--checkpoint-interval", "2", "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliable") / "run"
    assert main(["train", *QUICK, "--run-dir", str(path)]) == 0
    return path


def copy_run(run_dir: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


def one_error_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"sparsemoe {command}: error: "), err
    return err[0]


# --- checksums ------------------------------------------------------------------------------------------------


def test_every_checkpoint_file_has_a_checksum_sha256sum_can_check(run_dir):
    ckpt = resolve_checkpoint(run_dir)
    lines = (ckpt / CHECKSUMS).read_text().splitlines()
    assert sorted(line.split()[1] for line in lines) == sorted([META_FILE, MODEL_FILE, "optimizer.safetensors"])
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=ckpt, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count(": OK") == 3


def test_changed_bytes_are_caught_by_every_command(run_dir, tmp_path, capsys):
    broken = copy_run(run_dir, tmp_path, "broken")
    model_file = resolve_checkpoint(broken) / MODEL_FILE
    data = bytearray(model_file.read_bytes())
    tensors_start = 8 + int.from_bytes(data[:8], "little")  # past safetensors' header: only the values change
    rng = random.Random(0)
    for _ in range(100):  # the size stays the same: only a checksum sees it
        data[rng.randrange(tensors_start, len(data))] ^= 0xFF
    model_file.write_bytes(bytes(data))
    for argv, command in [
        (["generate", "--checkpoint", str(broken), "--max-new-tokens", "2"], "generate"),
        (["inspect", "--checkpoint", str(broken)], "inspect"),
        (["train", *QUICK, "--run-dir", str(broken), "--resume", "--max-steps", "6"], "train"),
        (["convert", str(broken), str(tmp_path / "hf")], "convert"),
    ]:
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert "model.safetensors' does not match its checksum" in line and "--no-verify" in line
    # Asked not to verify: it runs, unless the flipped bytes made a weight NaN or infinite (checked on every load).
    if main(["generate", "--checkpoint", str(broken), "--max-new-tokens", "2", "--no-verify"]) == 2:
        assert "NaN or infinite values" in one_error_line(capsys, "generate")


def test_a_file_from_another_checkpoint_is_caught(run_dir, tmp_path, capsys):
    """A copied older model.safetensors has the right size and a valid header: its checksum differs."""
    mixed = copy_run(run_dir, tmp_path, "mixed")
    steps = sorted((mixed / "checkpoints").glob("step-*"))
    assert len(steps) == 2  # steps 2 and 4 (kept: 2)
    shutil.copy(steps[0] / MODEL_FILE, steps[1] / MODEL_FILE)
    assert main(["generate", "--checkpoint", str(mixed)]) == 2
    assert "does not match its checksum" in one_error_line(capsys, "generate")


def test_a_deleted_checksum_file_is_reported(run_dir, tmp_path, capsys):
    bare = copy_run(run_dir, tmp_path, "bare")
    (resolve_checkpoint(bare) / CHECKSUMS).unlink()
    assert main(["inspect", "--checkpoint", str(bare)]) == 2
    assert f"has no {CHECKSUMS}" in one_error_line(capsys, "inspect")
    assert main(["inspect", "--checkpoint", str(bare), "--no-verify"]) == 0


def test_checksum_cost_tool_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "checksum_cost.py"), "--preset", "tiny", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "checksums" in done.stdout and "verify" in done.stdout


# --- bad checkpoints: one line each -----------------------------------------------------------------------------


def test_nan_weights_are_one_line(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    nan = copy_run(run_dir, tmp_path, "nan")
    path = resolve_checkpoint(nan) / MODEL_FILE
    state = load_file(path)
    key = next(k for k in state if "router.weight" in k)
    state[key][0, 0] = float("nan")
    save_file(state, path)
    for command in ("generate", "inspect"):
        assert main([command, "--checkpoint", str(nan), "--no-verify"]) == 2
        assert f"NaN or infinite values in 1 tensor(s), e.g. {key}" in one_error_line(capsys, command)


def test_unreadable_latest_is_one_line(run_dir, tmp_path, capsys):
    bad = copy_run(run_dir, tmp_path, "latest")
    (bad / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    assert "checkpoints/latest' is corrupt" in one_error_line(capsys, "generate")
    assert main(["train", *QUICK, "--run-dir", str(bad), "--resume"]) == 2
    assert "should hold the name of a checkpoint folder" in one_error_line(capsys, "train")


def test_trainer_json_without_step_is_one_line(run_dir, tmp_path, capsys):
    stepless = copy_run(run_dir, tmp_path, "stepless")
    meta_path = resolve_checkpoint(stepless) / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["step"]
    meta_path.write_text(json.dumps(meta))
    assert main(["train", *QUICK, "--run-dir", str(stepless), "--resume"]) == 2
    assert "trainer.json' does not match its checksum" in one_error_line(capsys, "train")
    assert main(["train", *QUICK, "--run-dir", str(stepless), "--resume", "--no-verify"]) == 2
    assert "has no valid step (found None)" in one_error_line(capsys, "train")


# --- bad arguments: one line each -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_temperature_must_be_finite(run_dir, value, capsys):
    assert main(["generate", "--checkpoint", str(run_dir), "--temperature", value]) == 2
    assert "expected a finite number >= 0" in one_error_line(capsys, "generate")


def test_run_dir_naming_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys, "train")


def test_lr_inf_says_finite(tmp_path, capsys):
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r"), "--lr", "inf"]) == 2
    assert "expected a finite number > 0" in one_error_line(capsys, "train")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--lr", "fast"])
    assert exit_.value.code == 2
    assert "argument --lr: invalid float value: 'fast'" in one_error_line(capsys, "train")


def test_bench_patterns_that_match_nothing(tmp_path, capsys):
    assert main(["bench", "--configs", "tiny", "--impls", "zzz*", "--out", str(tmp_path)]) == 2
    assert "--impls 'zzz*' matches no implementation" in one_error_line(capsys, "bench")


# --- data ------------------------------------------------------------------------------------------------------


def test_binary_and_non_utf8_files(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(b"text\0more")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    for name, why in (("blob.bin", "it is binary (a NUL byte at offset 4)"),
                      ("latin1.txt", "it is not UTF-8 text (byte 0xe9 at offset 3)")):  # fmt: skip
        assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path / name)]) == 2
        assert why in one_error_line(capsys, "train")
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tmp_path / "blob.bin", folder)
    shutil.copy(tmp_path / "latin1.txt", folder)
    (folder / "z_good.txt").write_text("def f(x):\n    return x\n" * 2000)  # read last, after both bad files
    corpus = load_corpus(str(folder))
    assert corpus.num_files == 1 and corpus.skipped == 2
    assert main(["train", *QUICK, "--run-dir", str(tmp_path / "r2"), "--data", str(folder)]) == 0
    assert "(2 binary or non-UTF-8 file(s) skipped)" in capsys.readouterr().out


def test_inspect_data_must_be_text(run_dir, tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    assert main(["inspect", "--checkpoint", str(run_dir), "--data", str(tmp_path / "blob.bin")]) == 2
    assert "cannot be trained on: it is binary" in one_error_line(capsys, "inspect")


@pytest.mark.parametrize("max_bytes", [50, 4001])
def test_max_bytes_is_exact(tmp_path, max_bytes):
    (tmp_path / "a.txt").write_text("é" * 3000)  # two bytes a character: the cut lands on a boundary
    (tmp_path / "b.txt").write_text("x" * 3000)
    for source in (None, str(tmp_path), str(tmp_path / "a.txt")):
        corpus = load_corpus(source, max_bytes=max_bytes)
        assert max_bytes - 1 <= corpus.num_bytes <= max_bytes
        text = bytes(torch.cat([corpus.train, corpus.val]).tolist())
        text.decode("utf-8")  # never half a character


# --- the layer ---------------------------------------------------------------------------------------------------


def test_a_huge_input_gives_an_error_not_a_non_finite_output():
    layer = MoE(MoEConfig(dim=16, num_experts=4, top_k=2))
    x = torch.randn(5, 16)
    x[0] = 1e38
    with pytest.raises(ValueError, match="MoE output is not finite .* 1 of 5 tokens; the router logits were finite"):
        layer(x)
    quiet = MoE(MoEConfig(dim=16, num_experts=4, top_k=2, check_finite=False))
    assert not torch.isfinite(quiet(x)).all()  # asked for no check: the overflow is the caller's to see


# --- run folders -------------------------------------------------------------------------------------------------


def test_a_restarted_run_does_not_log_steps_twice(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    stale = [{"event": "train", "step": s, "loss": 99.0} for s in (1, 2, 3)]  # a run killed before its first save
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    assert main(["train", *QUICK, "--run-dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r.get("event") == "train"]
    assert train_steps == [1, 2, 3, 4] and all(r.get("loss") != 99.0 for r in records)


def test_convert_recognises_a_training_run_folder(run_dir, tmp_path, capsys):
    assert main(["convert", str(run_dir), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and "wrote Hugging Face" in capsys.readouterr().out


def test_resume_with_more_steps_keeps_the_schedule(run_dir, tmp_path, capsys):
    kept, stretched = copy_run(run_dir, tmp_path, "kept"), copy_run(run_dir, tmp_path, "stretched")
    assert main(["train", *QUICK, "--run-dir", str(kept), "--resume", "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "max_steps 4 -> 8: the learning-rate schedule keeps its cosine ending at step 4" in out
    assert main(["train", *QUICK, "--run-dir", str(stretched), "--resume", "--max-steps", "8",
                 "--schedule-steps", "8"]) == 0  # fmt: skip
    assert "the learning-rate schedule now ends at step 8 (planned: 4)" in capsys.readouterr().out

    def lrs(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in records if "lr" in r}

    min_lr = 3e-3 * 0.1  # the tiny preset's lr x min_lr_ratio
    assert all(abs(lrs(kept)[s] - min_lr) < 1e-12 for s in range(5, 9))
    assert lrs(stretched)[5] > 2 * min_lr


# --- signals -----------------------------------------------------------------------------------------------------


def test_two_signals_during_one_long_operation_abort():
    """Both arrive while the main thread is inside one C call: CPython runs the handler once; the count of
    wakeup bytes still says two, so the run aborts instead of saving."""
    trainer = type("T", (), {"stop_requested": False})()
    a = torch.randn(1500, 1500)

    def send_two() -> None:
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    with StopOnSignal(trainer, announce=False):
        sender = threading.Thread(target=send_two)
        with pytest.raises(KeyboardInterrupt):
            sender.start()
            for _ in range(3):  # the handler runs after this C call returns, once for both signals
                torch.linalg.matrix_power(a, 12)
            time.sleep(0.5)
        sender.join()
    assert not trainer.stop_requested


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsemoe", "train", *QUICK, "--run-dir", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    time.sleep(0.8)  # inside the imports (torch takes seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["sparsemoe: interrupted"]
    assert not (tmp_path / "r" / "checkpoints").exists()


# --- fuzz: every numeric and path option, bad values ---------------------------------------------------------------

NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e308", "abc", "", "1.5", "0x10", "99999999999999999999999"]
PATHS = ["missing", "afile.txt", "blob.bin", "empty_dir", "run", "."]
BASE = {
    "train": ["train", "--preset", "tiny", "--max-bytes", "20000", "--max-steps", "1", "--batch-size", "2",
              "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--threads", "1"],
    "generate": ["generate", "--max-new-tokens", "2"],
    "inspect": ["inspect", "--max-bytes", "3000"],
    "convert": ["convert"],
    "bench": ["bench", "--configs", "tiny", "--tokens", "4", "--dtypes", "float32", "--routings", "random",
              "--repeats", "1", "--no-memory", "--no-plots", "--modes", "forward", "--impls", "sparsemoe grouped"],
}  # fmt: skip
NUMERIC_OPTIONS = {
    "train": ["--max-steps", "--batch-size", "--seq-len", "--accum-steps", "--lr", "--min-lr-ratio", "--warmup-steps",
              "--schedule-steps", "--weight-decay", "--grad-clip", "--expert-lr-mult", "--eval-interval",
              "--eval-batches", "--log-interval", "--checkpoint-interval", "--seed", "--val-fraction", "--max-bytes",
              "--threads", "--peak-tflops"],
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
    "inspect": ["--max-bytes"],
    "convert": ["--max-seq-len", "--max-shard-size"],
    "bench": ["--tokens", "--repeats", "--threads", "--backward-min-tokens"],
}  # fmt: skip
PATH_OPTIONS = {"train": ["--data", "--run-dir"], "generate": ["--checkpoint", "--tokenizer"],
                "inspect": ["--checkpoint", "--data"], "convert": ["src", "out"], "bench": ["--out"]}  # fmt: skip
# Options that make the run bigger: their large valid values are not bad values (a run of 1e308 steps).
SCALES_THE_WORK = {"--max-steps", "--batch-size", "--seq-len", "--accum-steps", "--eval-batches", "--max-new-tokens",
                   "--tokens", "--repeats", "--max-bytes", "--threads"}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_dir(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile.txt").write_text("def f():\n    pass\n" * 300)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty_dir").mkdir()
    shutil.copytree(run_dir, root / "run")
    return root


def _argv(command: str, option: str, value: str, root: Path, case: int) -> list[str]:
    argv = list(BASE[command])
    if option in PATH_OPTIONS[command]:
        value = str(root / value) if value != "." else str(root)
    if command in ("generate", "inspect") and option != "--checkpoint":
        argv += ["--checkpoint", str(root / "run")]
    if command == "train" and option != "--run-dir":
        argv += ["--run-dir", str(root / f"out-{case}")]
    if command == "bench" and option != "--out":
        argv += ["--out", str(root / f"bench-{case}")]
    if command == "convert":
        src, out = str(root / "run"), str(root / f"conv-{case}")
        if option == "src":
            src = value
        elif option == "out":
            out = value
        else:
            argv += [option, value]
        return [*argv, src, out]
    return [*argv, option, value]


@st.composite
def bad_arguments(draw):
    command = draw(st.sampled_from(sorted(BASE)))
    option = draw(st.sampled_from(NUMERIC_OPTIONS[command] + PATH_OPTIONS[command]))
    if option in PATH_OPTIONS[command]:
        value = draw(st.sampled_from(PATHS))
    else:
        values = [v for v in NUMBERS if not (option in SCALES_THE_WORK and v in ("1e308", "99999999999999999999999"))]
        value = draw(st.sampled_from(values))
    return command, option, value


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad_arguments(), st.integers(0, 10**6))
def test_fuzz_every_option_gives_success_or_one_line(fuzz_dir, capsys, case_args, case):
    command, option, value = case_args
    argv = _argv(command, option, value, fuzz_dir, case)
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: a value of the wrong type
        rc = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (argv, captured.err[-2000:])
    assert rc in (0, 2), (argv, rc, captured.err[-2000:])
    if rc == 2:
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and ": error: " in lines[0], (argv, lines)
