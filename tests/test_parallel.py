"""Expert parallelism on CPU/gloo with 2 and 4 processes: outputs and every gradient equal the
single-process layer's; clear errors for bad sharding, mismatched ranks, and dead or stalled peers.

Process start-up dominates the cost, so each spawned run checks many configurations at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsemoe import MoE, MoEConfig, update_expert_biases
from sparsemoe.parallel import ExpertParallelError, ExpertParallelMoE, make_groups, shard_experts, sync_gradients

# --- launching ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["SPARSEMOE_TEST_OUT"] = out_dir  # where a rank that exits on purpose leaves its result
    result = {"ok": False}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
        )
        result = {"ok": True, "result": fn(rank, world, *args)}
    except BaseException:  # report, never hang the launcher
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    os._exit(0)  # skip interpreter teardown with a process group that may have lost peers


def launch(fn, world: int, *args, timeout: float = 80.0) -> list[dict]:
    """Run fn(rank, world, *args) in `world` spawned processes on 127.0.0.1; return each rank's result."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                results.append({"ok": False, "error": f"rank {r} left no result (hung: {r in hung})"})
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r} failed:\n{res['error']}"
    return [res["result"] for res in results]


# --- configurations -----------------------------------------------------------------------------------------

BASE = dict(dim=12, hidden_dim=10, router_init_std=0.5)  # a wide router init makes the loads uneven
# name: (config fields, experts that receive no token, sequences per rank)
CASES = {
    "dropless-softmax": (dict(num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3), [6, 7], 3),
    "sigmoid-groups-bias-shared": (
        dict(
            num_experts=8,
            top_k=2,
            router="group_limited",
            num_groups=4,
            topk_groups=2,
            score_func="sigmoid",
            route_scale=2.5,
            bias_balancing=True,
            bias_update_rate=0.05,
            seq_aux_loss_coef=0.01,
            num_shared_experts=1,
            shared_expert_gate=True,
            aux_loss_mode="return",
        ),
        [1],
        2,
    ),
    "capacity-position": (dict(num_experts=4, top_k=2, capacity_factor=1.0, z_loss_coef=1e-3), [3], 3),
    "capacity-weight-k1-relu": (
        dict(num_experts=4, top_k=1, activation="relu", capacity_factor=1.25, capacity_priority="weight", renormalize=False),
        [],
        2,
    ),
    "expert-choice-gelu": (dict(num_experts=8, top_k=2, router="expert_choice", activation="gelu", z_loss_coef=1e-3), [], 2),
    "after-topk-geglu-capacity-backend": (
        dict(num_experts=4, top_k=2, score_order="after_topk", activation="geglu", backend="capacity"),
        [0],
        2,
    ),
    "reference-backend": (dict(num_experts=4, top_k=3, backend="reference", aux_loss_coef=0.02), [2], 1),
    # rank 1 has no tokens at all; every collective must still run there
    # (and its bias moves once per step, from the global load counted in the forward)
    "idle-rank": (
        dict(num_experts=4, top_k=2, seq_aux_loss_coef=0.01, z_loss_coef=1e-3, bias_balancing=True, bias_update="step"),
        [],
        [2, 0],
    ),
}
SEQ = 5


def _batch(world: int, dim: int, seqs) -> list[torch.Tensor]:
    sizes = seqs if isinstance(seqs, list) else [seqs] * world
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), SEQ, dim, generator=g)
    x[..., 0] = 1.0  # a constant feature lets the test switch experts off through the router
    return list(x.split(sizes))


def _full_layer(cfg: MoEConfig, dead: list[int]) -> MoE:
    torch.manual_seed(3)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[dead, 0] = -40.0  # these experts never win a token (token-choice)
        for p in layer.parameters():  # non-zero starts for the gates that init to zero
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return layer


def _twin(layer: MoE, **changes) -> MoE:
    other = MoE(dataclasses.replace(layer.config, **changes))
    other.load_state_dict(layer.state_dict())
    return other


def _reference(full: MoE, xs: list[torch.Tensor], gs: list[torch.Tensor]):
    """The single-process oracle, one process, full weights.

    Outputs: the layer on each rank's batch (capacity and expert-choice decide per rank; for dropless
    token-choice this equals the layer on the global batch). Losses and the bias update: the layer on
    the global batch. Objective: mean over ranks of sum(y_r * g_r), plus the global balancing losses.
    """
    W = len(xs)
    outputs = _twin(full, aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0, aux_loss_mode="return").eval()
    losses = _twin(full, aux_loss_mode="return").train()
    xs = [x.clone().requires_grad_(True) for x in xs]
    x_all = torch.cat(xs)
    ys = [outputs(x) if x.shape[0] else torch.zeros_like(x) for x in xs]
    losses(x_all)
    objective = sum((y * g).sum() for y, g in zip(ys, gs)) / W + losses.aux_loss
    objective.backward()
    update_expert_biases(losses)  # bias_update="step" (else nothing)
    grads = {}
    for (name, p), (_, q) in zip(outputs.named_parameters(), losses.named_parameters()):
        grads[name] = sum(t.grad if t.grad is not None else torch.zeros_like(t) for t in (p, q))
    return ys, [x.grad for x in xs], grads, losses.aux_loss.detach(), losses.router.expert_bias.clone()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) if a.numel() else 0.0


def check_case(rank: int, world: int, ep_size: int, name: str) -> dict[str, float]:
    """Run one configuration sharded over ep_size ranks (world/ep_size replicas); return relative errors."""
    fields, dead, seqs = CASES[name]
    cfg = MoEConfig(**BASE, **fields)
    full = _full_layer(cfg, dead)
    xs = _batch(world, cfg.dim, seqs)
    gs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(11 + r)) for r, x in enumerate(xs)]
    ys_ref, dx_ref, grads_ref, aux_ref, bias_ref = _reference(full, xs, gs)

    groups = make_groups(ep_size)
    layer = shard_experts(copy.deepcopy(full), groups).train()
    assert isinstance(layer, ExpertParallelMoE) and layer.num_local_experts == cfg.num_experts // ep_size
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x)
    objective = (y * gs[rank]).sum()
    if cfg.aux_loss_mode == "return":
        objective = objective + layer.aux_loss
    objective.backward()
    sync_gradients(layer, groups)
    update_expert_biases(layer)

    lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
    errors = {"output": _max_err(y.detach(), ys_ref[rank]), "input grad": _max_err(x.grad / world, dx_ref[rank])}
    for pname, p in layer.named_parameters():
        ref = grads_ref[pname][lo:hi] if pname.startswith("experts.") else grads_ref[pname]
        errors[f"grad {pname}"] = _max_err(p.grad, ref)
    aux_mean = layer.aux_loss.detach().clone()
    dist.all_reduce(aux_mean)
    errors["aux_loss"] = _max_err(aux_mean / world, aux_ref)
    errors["expert_bias"] = _max_err(layer.router.expert_bias, bias_ref)
    # What the case exercised, summed over ranks: experts with no token, dropped assignments.
    loads = layer.stats.tokens_per_expert.clone()
    dropped = layer.stats.dropped_fraction.reshape(1).clone()
    dist.all_reduce(loads)
    dist.all_reduce(dropped)
    return {"errors": errors, "idle_experts": int((loads == 0).sum()), "dropped": float(dropped)}


# --- error paths --------------------------------------------------------------------------------------------


def check_errors(rank: int, world: int, report: dict) -> dict[str, str]:
    """Clear errors: indivisible E, mismatched configs, a stalled peer, a dead peer (checked last)."""
    out: dict = {}
    groups = make_groups(world)
    try:
        shard_experts(MoE(dim=8, hidden_dim=8, num_experts=3, top_k=1), groups)
    except ValueError as err:
        out["indivisible"] = str(err)
    try:
        shard_experts(MoE(dim=8, hidden_dim=8, num_experts=4, top_k=1 + rank), groups)
    except ValueError as err:
        out["mismatch"] = str(err)

    # A stalled peer: rank 1 sleeps through rank 0's forward; the group's timeout ends the wait.
    short = dist.new_group(list(range(world)), timeout=timedelta(seconds=1.5))
    layer = shard_experts(MoE(dim=8, hidden_dim=8, num_experts=4), short)
    dist.barrier()
    if rank == 0:
        start = time.monotonic()
        try:
            layer(torch.randn(6, 8))
        except ExpertParallelError as err:
            out["stalled"] = str(err)
        out["stalled_seconds"] = time.monotonic() - start
    else:
        time.sleep(3.5)

    # A dead peer: rank 1 exits; rank 0's next collective fails instead of waiting forever.
    layer = shard_experts(MoE(dim=8, hidden_dim=8, num_experts=4), groups)
    dist.barrier()
    if rank != 0:
        with open(os.environ["SPARSEMOE_TEST_OUT"] + f"/rank{rank}.json", "w") as f:
            json.dump({"ok": True, "result": {**report, "errors": out}}, f)
        os._exit(1)
    start = time.monotonic()
    try:
        for _ in range(3):
            layer(torch.randn(6, 8))
            time.sleep(0.5)
    except ExpertParallelError as err:
        out["dead"] = str(err)
    out["dead_seconds"] = time.monotonic() - start
    return out


# --- training -----------------------------------------------------------------------------------------------

TRAIN = dict(max_steps=3, log_interval=1, eval_interval=3, eval_batches=1, warmup_steps=10, checkpoint_interval=3)
MAX_BYTES = 120_000  # a quick corpus: the first standard-library files


def _configs(**train_changes):
    from sparsemoe.model import preset
    from sparsemoe.train import TRAIN_PRESETS, TrainConfig

    # warmup longer than the run: the lr of step s does not depend on max_steps, so runs of different
    # lengths (and a resumed one) take identical steps. The selection bias moves once per step, from the
    # global batch's load.
    model = preset("tiny", aux_loss_coef=0.01, z_loss_coef=1e-3, bias_balancing=True, bias_update="step")
    return model, TrainConfig(**{**TRAIN_PRESETS["tiny"], **TRAIN, **train_changes})


def train_parallel(rank: int, world: int, ep_size: int, run_dir: str) -> None:
    from sparsemoe.parallel.train import run_parallel_training

    model_cfg, train_cfg = _configs(activation_checkpointing=True)  # the all-to-alls run again in the backward
    run_parallel_training(model_cfg, train_cfg, run_dir, make_groups(ep_size), max_bytes=MAX_BYTES, progress=False, log=lambda s: None)


def run_cases(rank: int, world: int, plan: list[tuple[int, str]], with_errors: bool, train: tuple = ()) -> dict:
    from sparsemoe.parallel.comm_report import _measure_worker

    report = {f"ep{ep}/{name}": check_case(rank, world, ep, name) for ep, name in plan}
    # the communication report's measurement, on this world (one small shape, 2 repeats)
    report["comm"] = _measure_worker(rank, world, [(16, 24)], 2, 2)
    if train:
        train_parallel(rank, world, *train)
    if with_errors:
        report["errors"] = check_errors(rank, world, report)
    return report


# --- tests --------------------------------------------------------------------------------------------------

TOL = 2e-5


def _assert_comm_measured(reports: list[dict], world: int) -> None:
    (row,) = reports[0]["comm"]
    assert row["all_to_all_ms"] > 0 and row["experts_forward_ms"] > 0
    # 24 tokens x K=2 rows of 16 float32, uniform splits: all but this rank's 1/W share leave the rank
    assert row["bytes_sent_per_rank"] == (48 - 48 // world) * 16 * 4


def _assert_close(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        for case, errors in report.items():
            if case in ("errors", "comm"):
                continue
            bad = {k: v for k, v in errors["errors"].items() if not v <= TOL}
            assert not bad, f"rank {rank}, {case}: relative errors above {TOL}: {bad}"


def test_two_processes_match_single_process_and_fail_clearly():
    plan = [(2, name) for name in CASES]
    reports = launch(run_cases, 2, plan, True)
    _assert_close(reports)
    assert len(reports[0]) == len(CASES) + 2
    _assert_comm_measured(reports, 2)
    # The cases exercised what they claim: idle experts, drops under capacity.
    assert reports[0]["ep2/dropless-softmax"]["idle_experts"] == 2
    assert reports[0]["ep2/capacity-position"]["dropped"] > 0
    assert reports[0]["ep2/capacity-weight-k1-relu"]["dropped"] > 0
    err0 = reports[0]["errors"]
    for rank in (0, 1):
        errs = reports[rank]["errors"]
        assert "num_experts=3 is not divisible by the expert-parallel size 2" in errs["indivisible"]
        assert "differs between ranks" in errs["mismatch"] and "top_k" in errs["mismatch"]
    assert "failed on rank 0" in err0["stalled"] and err0["stalled_seconds"] < 15
    assert "failed on rank 0" in err0["dead"] and err0["dead_seconds"] < 20


FOUR_PLAN = [(ep, n) for ep in (4, 2) for n in ("dropless-softmax", "sigmoid-groups-bias-shared", "capacity-position", "expert-choice-gelu")]


@pytest.fixture(scope="module")
def four_process_run(tmp_path_factory):
    """One 4-process launch: the layer cases with ep=4 and ep=2 (x2 replicas), then 3 training steps with ep=2
    and activation checkpointing."""
    run_dir = tmp_path_factory.mktemp("parallel") / "ep2x2"
    reports = launch(run_cases, 4, FOUR_PLAN, False, (2, str(run_dir)), timeout=120)
    return reports, run_dir


def test_four_processes_expert_and_data_parallel_match_single_process(four_process_run):
    reports, _ = four_process_run
    _assert_close(reports)
    assert all(len(r) == len(FOUR_PLAN) + 1 for r in reports)
    _assert_comm_measured(reports, 4)
    assert reports[0]["ep4/dropless-softmax"]["idle_experts"] == 2  # rank 3 holds experts 6, 7: no rows


def _train_records(run_dir):
    from sparsemoe.train.report import read_metrics

    return {(r["event"], r["step"]): r for r in read_metrics(run_dir / "metrics.jsonl")}


def test_data_expert_parallel_training_matches_single_process_and_resumes_on_one(four_process_run, tmp_path):
    _, parallel_dir = four_process_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the spawned ranks; tiny matrices run faster on one thread here
    try:
        _compare_training(parallel_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_training(parallel_dir, tmp_path) -> None:
    import shutil

    from sparsemoe.train.run import run_training, saved_configs

    model_cfg, train_cfg = _configs(max_steps=5)
    run_training(model_cfg, train_cfg, tmp_path / "single", max_bytes=MAX_BYTES, progress=False, log=lambda s: None)
    single = _train_records(tmp_path / "single")
    parallel = _train_records(parallel_dir)
    assert saved_configs(parallel_dir)[1].activation_checkpointing and not train_cfg.activation_checkpointing
    for step in (1, 2, 3):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert parallel[("train", step)][key] == pytest.approx(single[("train", step)][key], rel=1e-5), (step, key)
    assert parallel[("eval", 3)]["val_loss"] == pytest.approx(single[("eval", 3)]["val_loss"], rel=1e-5)

    # The 4-process checkpoint (full tensors, rank 0) resumes in one process and continues identically.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(parallel_dir, resumed_dir)
    run_training(model_cfg, train_cfg, resumed_dir, resume=True, max_bytes=MAX_BYTES, progress=False, log=lambda s: None)
    resumed = _train_records(resumed_dir)
    for step in (4, 5):
        assert resumed[("train", step)]["loss"] == pytest.approx(single[("train", step)]["loss"], rel=1e-5), step


def test_shard_requires_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="not initialised"):
        make_groups(2)


def train_on_bpe(rank: int, world: int, run_dir: str, text: str) -> dict:
    """Two ranks, a BPE tokenizer trained on text: rank 0 tokenizes into RUN/data, both train on it."""
    from sparsemoe.parallel.train import run_parallel_training

    model_cfg, train_cfg = _configs(max_steps=2)
    run_parallel_training(model_cfg, train_cfg, run_dir, make_groups(1), data=text, tokenizer="bpe:300",
                          progress=False, log=lambda s: None)  # fmt: skip
    return {}


def test_two_processes_train_on_bpe_token_shards_as_one_does(tmp_path):
    from sparsemoe.train.run import run_training

    text = tmp_path / "text.py"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i % 13} + {i % 7}\n\n" for i in range(800)))
    run_dir = tmp_path / "parallel"
    launch(train_on_bpe, 2, str(run_dir), str(text))
    assert (run_dir / "data" / "index.json").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    model_cfg, train_cfg = _configs(max_steps=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process on the shards the two prepared: the same global batches, the same losses
        run_training(model_cfg, train_cfg, tmp_path / "single", data=str(run_dir / "data"), progress=False,
                     log=lambda s: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    single, parallel = _train_records(tmp_path / "single"), _train_records(run_dir)
    for step in (1, 2):
        assert parallel[("train", step)]["loss"] == pytest.approx(single[("train", step)]["loss"], rel=1e-5)
    assert parallel[("eval", 2)]["val_bpb"] == pytest.approx(single[("eval", 2)]["val_bpb"], rel=1e-5)
