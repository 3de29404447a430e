"""Single-process parts of sparsemoe.parallel: the communication cost model and report, the torchrun
entry point's argument errors and a one-process run, the all-to-all on a group of one."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from sparsemoe.parallel import comm_report
from sparsemoe.parallel.comm_report import ASSUMPTIONS, MODELS, bytes_per_token, compute_to_comm_ratio, flops_per_token

MIXTRAL = MODELS["Mixtral-8x7B"]


def test_bytes_per_token_counts_dispatch_and_combine_of_remote_rows():
    # 2 exchanges * K=2 rows * D=4096 * 2 bytes, 7 of 8 ranks remote
    b = bytes_per_token(MIXTRAL, 8, 2)
    assert b["forward"] == 2 * 2 * 4096 * 2 * 7 / 8 == 28672
    assert b["training"] == 2 * b["forward"]
    assert bytes_per_token(MIXTRAL, 1024, 2)["forward"] == pytest.approx(2 * 2 * 4096 * 2 * 1023 / 1024)


def test_flops_and_ratio_follow_the_documented_model():
    f = flops_per_token(MIXTRAL)
    assert f["forward"] == 2 * (2 * 4096 * 2 * 14336 + 2 * 14336 * 4096)
    a = dict(ASSUMPTIONS)
    T = a["tokens_per_rank"]
    compute = T * f["training"] / (a["peak_tflops"] * 1e12 * a["utilisation"])
    comm = 4 * (a["alpha_us"] * 1e-6 * 7 + T * 28672 / 2 / 12.5e9)
    assert compute_to_comm_ratio(MIXTRAL, 8, 12.5, a) == pytest.approx(compute / comm)
    # more bandwidth, better ratio; more ranks than experts: not applicable
    assert compute_to_comm_ratio(MIXTRAL, 8, 450.0, a) > compute_to_comm_ratio(MIXTRAL, 8, 50.0, a)
    assert compute_to_comm_ratio(MIXTRAL, 16, 450.0, a) is None
    # latency grows with ranks: the ratio falls as a fine-grained model spreads wider
    switch = MODELS["Switch-C"]
    ratios = [compute_to_comm_ratio(switch, r, 50.0, a) for r in comm_report.RANKS]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)


def test_report_tables_cover_8_to_1024_ranks_and_every_interconnect(tmp_path, monkeypatch):
    fake = {"2": [dict(dim=8, tokens_per_rank=4, top_k=2, all_to_all_ms=1.0, experts_forward_ms=3.0,
                       bytes_sent_per_rank=128, achieved_GBps=1.28e-4, compute_to_comm=1.5)]}
    monkeypatch.setattr(comm_report, "measured", lambda quick: fake)
    report = comm_report.run_comm_report(str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "comm_report.json").read_text())
    assert saved["measured"] == fake and saved["assumptions"] == ASSUMPTIONS
    markdown = (tmp_path / "comm_report.md").read_text()
    for name in MODELS:
        assert name in markdown
    for link in comm_report.INTERCONNECTS_GBPS:
        assert link in markdown
    rows = report["planned"]["DeepSeek-V3"]["ranks"]
    assert list(rows) == [str(r) for r in comm_report.RANKS]
    assert rows["256"]["compute_to_comm"]["IB NDR 400Gb/s"] is not None and rows["512"]["compute_to_comm"]["IB NDR 400Gb/s"] is None
    assert "| 2 | 8 | 4 | 1.000 |" in markdown


@pytest.fixture
def world_of_one(monkeypatch):
    """torch.distributed initialised as a single process (restored afterwards)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_entry_point_rejects_bad_ep_size_in_one_line(world_of_one, tmp_path, capsys):
    from sparsemoe.cli import main

    assert main(["train-parallel", "--ep-size", "3", "--preset", "tiny", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsemoe train-parallel: error: (rank 0)")
    assert "ep_size=3 must divide the world size 1" in err[0]
    assert not dist.is_initialized()


def test_entry_point_trains_one_process_and_writes_a_full_checkpoint(world_of_one, tmp_path, capsys):
    from sparsemoe.cli import main
    from sparsemoe.train import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train-parallel", "--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--max-bytes", "60000",
                     "--run-dir", str(tmp_path / "r"), "--no-progress", "--eval-batches", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    model, meta = load_model(tmp_path / "r")  # the plain single-process loader
    assert meta["step"] == 2 and meta["parallel"] == {"world_size": 1, "ep_size": 1}
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())



def test_expert_parallel_layer_is_built_from_a_layer():
    from sparsemoe.parallel import ExpertParallelMoE

    with pytest.raises(TypeError, match="shard_experts"):
        ExpertParallelMoE(dim=8)
