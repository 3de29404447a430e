"""Device and precision choices (sparsemoe.device), model FLOPs (sparsemoe.model.flops) and the training
memory estimate (sparsemoe.train.memory), on the CPU and the meta device."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsemoe import device as devices
from sparsemoe.device import DeviceError, resolve_device, resolve_precision
from sparsemoe.model import MoETransformer, preset
from sparsemoe.model.flops import (
    attention_flops_per_token,
    forward_flops_per_token,
    matmul_weights_per_token,
    mean_causal_context,
    training_flops_per_token,
)
from sparsemoe.train import TrainConfig
from sparsemoe.train.memory import _saved_bytes, check_fits, estimate_training_memory


@pytest.fixture
def one_gpu(monkeypatch):
    """CUDA as it looks with one GPU, on a machine without one (nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# --- devices ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused():
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=f"device '{name}' was asked for, but no CUDA GPU is available here"):
            resolve_device(name)


def test_bad_device_names_say_what_is_accepted():
    for name in ("tpu", "cuda:x", "gpu", "mps"):
        with pytest.raises(DeviceError, match="accepted: auto, cpu, cuda, cuda:N"):
            resolve_device(name)
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device("meta")
    assert resolve_device("meta", allow_meta=True) == torch.device("meta")


def test_cuda_indices_are_checked_against_the_gpus_there_are(one_gpu):
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:1' does not exist: there is 1 CUDA GPU here \(cuda:0\)"):
        resolve_device("cuda:1")


def test_precision_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        TrainConfig(precision="fp16")


def test_tf32_is_allowed_for_fp32_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    devices.configure_matmuls(torch.device("cpu"), "fp32")
    devices.configure_matmuls(torch.device("cuda", 0), "bf16")
    assert not torch.backends.cuda.matmul.allow_tf32
    devices.configure_matmuls(torch.device("cuda", 0), "fp32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize(
    "name, bf16, fp32",
    [("NVIDIA H200", 989.4, 494.7), ("NVIDIA H100 80GB HBM3", 989.4, 494.7), ("NVIDIA H100 PCIe", 756.0, 378.0),
     ("NVIDIA A100-SXM4-80GB", 312.0, 156.0), ("NVIDIA GeForce RTX 4090", None, None)],
)  # fmt: skip
def test_peak_tflops_by_device_name(name, bf16, fp32, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert (devices.peak_tflops(cuda, "bf16"), devices.peak_tflops(cuda, "fp32")) == (bf16, fp32)
    assert devices.peak_tflops(torch.device("cpu"), "bf16") is None


def test_free_memory_of_the_cpu_is_known_and_of_meta_is_not():
    free = devices.free_memory(torch.device("cpu"))
    assert free is not None and free > 2**20
    assert devices.free_memory(torch.device("meta")) is None


# --- model FLOPs --------------------------------------------------------------------------------------------


def _measured_forward_flops(model, tokens: int) -> int:
    """FLOPs of the weight products (mm, addmm) torch counts in a real forward; attention's batched
    products and fused kernels are left out."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    by_op = counter.get_flop_counts()["Global"]
    return sum(n for op, n in by_op.items() if str(op) in ("aten.mm", "aten.addmm"))


@pytest.mark.parametrize(
    "overrides",
    [dict(dense=True), dict(moe_backend="reference"), dict(moe_backend="reference", num_shared_experts=1, top_k=1),
     dict(moe_backend="reference", tie_embeddings=True), dict(dense=True, attention="mla", q_lora_rank=16)],
)  # fmt: skip
def test_matmul_flops_match_what_torch_counts(overrides):
    """2 FLOPs per active weight and token: the routed experts count K of E (the reference loop multiplies
    each token by its K experts only, which torch's counter sees)."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", **overrides)).eval()
    T = 24
    assert 2 * matmul_weights_per_token(model) * T == _measured_forward_flops(model, T)


def test_active_weights_are_the_active_parameters_less_lookups_and_vectors():
    model = MoETransformer(preset("tiny"))
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert matmul_weights_per_token(model) == model.num_active_params() - model.embed.weight.numel() - vectors


def test_attention_flops_count_each_query_at_its_causal_context():
    for S, window in ((1, None), (7, None), (10, 4), (10, 10), (10, 20), (256, 64)):
        want = sum(min(i, window or i) for i in range(1, S + 1)) / S
        assert mean_causal_context(S, window) == pytest.approx(want)
    cfg = preset("tiny")  # 2 layers, 2 heads of width 16
    assert attention_flops_per_token(cfg, 64) == 2 * (2 * 2 * (16 + 16) * 32.5)
    mla = preset("tiny", attention="mla", head_dim=8, qk_nope_head_dim=12, v_head_dim=10)
    assert attention_flops_per_token(mla, 9) == 2 * (2 * 2 * (12 + 8 + 10) * 5)
    sliding = preset("tiny", sliding_window=8, sliding_layers=[0])
    assert attention_flops_per_token(sliding, 64) == 2 * 2 * 32 * (mean_causal_context(64, 8) + 32.5)


def test_training_flops_are_three_forwards_and_meta_models_count_alike():
    cfg = preset("demo")
    with torch.device("meta"):
        meta = MoETransformer(cfg)
    real = MoETransformer(cfg)
    assert training_flops_per_token(meta, 256) == training_flops_per_token(real, 256) == 3 * forward_flops_per_token(
        real, 256
    )
    dense = MoETransformer(cfg.dense_baseline())
    # the dense twin has the same active weights but the routers'
    router_weights = sum(layer.router.weight.numel() for layer in real.moe_layers)
    assert matmul_weights_per_token(real) - matmul_weights_per_token(dense) == router_weights


# --- the memory estimate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_shared_experts=1), dict(dense=True), dict(attention="mla"),
     dict(attention_gate=True, qk_norm=True), dict(tie_embeddings=True, sliding_window=8)],
)  # fmt: skip
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_on_meta_matches_a_real_forward(overrides, precision):
    """What the meta run counts is what a real CPU forward keeps for its backward: the same in float32 (the
    CPU's fused attention keeps what the stand-in does), near it under bfloat16 autocast (where the estimate
    adds the weights' bfloat16 copies by rule)."""
    cfg = preset("tiny", moe_backend="grouped", **overrides)
    train = TrainConfig(batch_size=4, seq_len=32)
    estimate = estimate_training_memory(cfg, train, precision)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        per_block, outside = _saved_bytes(model, train.batch_size, train.seq_len)
    measured = sum(per_block) + outside
    tolerance = 0.05 if precision == "fp32" else 0.25
    assert estimate.activations == pytest.approx(measured, rel=tolerance)


def test_states_are_sixteen_bytes_a_parameter_and_checkpointing_keeps_less():
    cfg = preset("demo")
    model = MoETransformer(cfg)
    n = model.num_params()
    plain = estimate_training_memory(cfg, TrainConfig(batch_size=16, seq_len=256), "fp32")
    assert (plain.parameters, plain.gradients, plain.optimizer) == (4 * n, 4 * n, 8 * n)
    assert plain.transient == 2 * 16 * 256 * 256 * 4  # the float32 logits and their gradient
    recomputed = estimate_training_memory(
        cfg, TrainConfig(batch_size=16, seq_len=256, activation_checkpointing=True), "fp32"
    )
    assert recomputed.states == plain.states and recomputed.activations < 0.6 * plain.activations
    twice = estimate_training_memory(cfg, TrainConfig(batch_size=32, seq_len=256), "fp32")
    assert twice.activations == pytest.approx(2 * plain.activations, rel=0.05)


def test_a_run_that_cannot_fit_is_refused_with_what_to_change(monkeypatch):
    estimate = estimate_training_memory(preset("demo"), TrainConfig(batch_size=16, seq_len=256), "fp32")
    monkeypatch.setattr(devices, "free_memory", lambda device: estimate.total + 1)
    monkeypatch.setattr("sparsemoe.train.memory.free_memory", devices.free_memory)
    check_fits(estimate, torch.device("cpu"), "this run")  # fits
    monkeypatch.setattr("sparsemoe.train.memory.free_memory", lambda device: estimate.total // 2)
    with pytest.raises(DeviceError, match="this run needs about .* free on CPU .*lower --batch-size or --seq-len"):
        check_fits(estimate, torch.device("cpu"), "this run")
    monkeypatch.setattr("sparsemoe.train.memory.free_memory", lambda device: estimate.states // 2)
    with pytest.raises(DeviceError, match="weights, gradients and AdamW alone do not fit: shrink the model"):
        check_fits(estimate, torch.device("cpu"), "this run")
    monkeypatch.setattr("sparsemoe.train.memory.free_memory", lambda device: None)
    check_fits(estimate, torch.device("meta"), "this run")  # unknown: not refused


def test_the_gpu_preset_and_its_dense_twin_fit_one_80_gb_gpu_with_equal_active_parameters():
    from sparsemoe.train import TRAIN_PRESETS

    cfg = preset("gpu")
    with torch.device("meta"):
        moe, dense = MoETransformer(cfg), MoETransformer(cfg.dense_baseline())
    assert 0.5e9 < moe.num_params() < 1e9 and 8 <= cfg.num_experts <= 64
    assert moe.num_active_params() - dense.num_active_params() == sum(m.router.weight.numel() for m in moe.moe_layers)
    train = TrainConfig(**TRAIN_PRESETS["gpu"])
    for model_cfg in (cfg, cfg.dense_baseline()):
        assert estimate_training_memory(model_cfg, train, "bf16").total < 70 * 2**30
