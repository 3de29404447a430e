"""tools/gpu_check.sh --dry-run: every step of the GPU check, on the CPU with tiny shapes, so that a device
minute is never lost to a typo in the script or a changed option."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PATH=os.environ["PATH"])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 = this interpreter
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "gpu_tests.log", "hf-bench.log", "hf-bench/hf_bench.json", "hf-bench/hf_bench.md", "tiny.log",
        "tiny/bench.json", "tiny/bench.md", "train.log",
    ]  # fmt: skip
    assert "| sparsemoe |" in (out / "hf-bench" / "hf_bench.md").read_text()
    assert "tests exit status: 0" in (out / "gpu_tests.log").read_text()
    train = (out / "train.log").read_text()
    assert train.count("finished at step 3") == 2 and "dense baseline" in train and "MoE 16 experts, top-4" in train
    assert "| sparsemoe auto |" in (out / "tiny" / "bench.md").read_text()
    assert "tokens/s" in done.stdout and not (tmp_path / "work" / "train-moe").exists()
