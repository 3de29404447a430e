"""The main job on CUDA: training (bf16 autocast, fused AdamW, Triton experts, compile), checkpoints that
move between the GPU and the CPU, generation with the cache on the device, and the memory estimate
against the allocator's peak. Marked `gpu`: skipped without a CUDA GPU (tools/gpu_check.sh runs them)."""

import math

import pytest
import torch

from sparsemoe.dispatch import resolve_backend
from sparsemoe.model import MoETransformer, generate, preset
from sparsemoe.train import RandomBatches, TrainConfig, Trainer, build_optimizer, eval_batches, load_corpus, load_model
from sparsemoe.train.memory import estimate_training_memory

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, max_bytes=120_000)


def make_trainer(corpus, device, run_dir=None, model_overrides=None, **train_overrides):
    """The tiny model, initialised on the CPU from the seed and moved (as `sparsemoe train` does)."""
    cfg = TrainConfig(
        **{**dict(max_steps=6, batch_size=8, seq_len=32, warmup_steps=2, eval_interval=3, eval_batches=2,
                  log_interval=1, checkpoint_interval=3), **train_overrides}
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = MoETransformer(preset("tiny", **(model_overrides or {}))).to(device)
    batches = RandomBatches(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    meta = {"model_config": model.config.to_dict()}
    return Trainer(
        model, build_optimizer(model, cfg), cfg, batches, val, run_dir, meta=meta, progress=False, device=device
    )


def losses(trainer):
    return [r["loss"] for r in trainer.metrics.records if r["event"] == "train"]


def test_cuda_training_uses_bf16_fused_adamw_and_the_triton_experts(corpus):
    trainer = make_trainer(corpus, "cuda")
    assert trainer.precision == "bf16"  # "auto" on CUDA
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    x = torch.randn(64, 32, device="cuda")
    assert resolve_backend("auto", x, None).name == "triton"
    summary = trainer.fit()
    assert all(math.isfinite(v) for v in losses(trainer)) and losses(trainer)[-1] < losses(trainer)[0]
    assert summary["peak_memory_bytes"] > 0 and "cuda" in trainer.rng_states()


def test_fp32_on_cuda_allows_tf32(corpus):
    trainer = make_trainer(corpus, "cuda", precision="fp32")
    assert trainer.precision == "fp32" and torch.backends.cuda.matmul.allow_tf32
    trainer.fit()
    assert all(math.isfinite(v) for v in losses(trainer))


@pytest.fixture
def no_tf32(monkeypatch):
    """IEEE float32 products on the GPU, as on the CPU (the trainer would allow TF32 for fp32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr("sparsemoe.train.trainer.configure_matmuls", lambda device, precision: None)


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_moves_between_the_gpu_and_the_cpu(corpus, tmp_path, first, second, no_tf32):
    """Stop at step 3 on one device, resume on the other: the same losses as an uninterrupted run on the
    second device, up to the two devices' float32 arithmetic."""
    settings = dict(precision="fp32", max_steps=6)
    want = losses(_run(make_trainer(corpus, second, **settings)))
    split = make_trainer(corpus, first, tmp_path, **settings)
    split.on_log.append(lambda record: setattr(split, "stop_requested", record["step"] == 3))
    split.fit()
    resumed = make_trainer(corpus, second, tmp_path, **settings)
    resumed.resume(tmp_path)
    assert resumed.step == 3
    assert all(bool(group["fused"]) == (second == "cuda") for group in resumed.optimizer.param_groups)
    resumed.fit()
    assert losses(resumed) == pytest.approx(want, rel=1e-4)


def _run(trainer):
    trainer.fit()
    return trainer


def test_compiled_training_with_the_triton_backend(corpus):
    torch._dynamo.reset()
    eager = _run(make_trainer(corpus, "cuda", max_steps=3))
    compiled = _run(make_trainer(corpus, "cuda", max_steps=3, compile=True))
    assert losses(compiled) == pytest.approx(losses(eager), rel=2e-2)


def test_generation_keeps_the_cache_on_the_gpu_and_agrees_with_the_cpu(corpus, tmp_path, no_tf32):
    _run(make_trainer(corpus, "cpu", tmp_path, max_steps=3))
    cpu, _ = load_model(tmp_path, "cpu")
    gpu, _ = load_model(tmp_path, "cuda", torch.float32)
    assert gpu.new_cache(1).keys[0].device.type == "cuda"
    ids = torch.tensor(list(b"def main():\n"))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids[None].cuda()).logits.cpu(), cpu(ids[None]).logits, atol=2e-3, rtol=1e-3)
    generator = torch.Generator().manual_seed(0)  # on the host: sampling is the same on both devices
    out = generate(gpu, ids, 20, temperature=0.8, top_p=0.95, generator=generator)
    assert out.device.type == "cuda" and out.shape == (1, 20)
    half, _ = load_model(tmp_path, "cuda", torch.bfloat16)
    assert generate(half, ids, 5, temperature=0).shape == (1, 5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_memory_estimate_is_near_the_allocators_peak(corpus, precision):
    """The estimate made before allocating, against what the caching allocator handed out at most in a
    training step of the demo model."""
    cfg = TrainConfig(batch_size=16, seq_len=256, precision=precision, max_steps=2, eval_interval=100)
    model_cfg = preset("demo")
    estimate = estimate_training_memory(model_cfg, cfg, precision)
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = MoETransformer(model_cfg).cuda()
    batches = RandomBatches(corpus.train, cfg.batch_size, cfg.seq_len)
    trainer = Trainer(model, build_optimizer(model, cfg), cfg, batches, [], progress=False, device="cuda")
    trainer.train_step()  # the optimizer's state exists from the first step on
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step()
    peak = torch.cuda.max_memory_allocated()
    print(f"{precision}: estimate {estimate.total / 2**20:.0f} MiB, measured peak {peak / 2**20:.0f} MiB")
    assert 0.6 * peak < estimate.total < 1.5 * peak


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_transformers_experts_implementation_on_cuda(family):
    """experts_implementation="sparsemoe" on CUDA (Triton for the fused layout, the general path for GPT-OSS):
    float32 logits and gradients as eager's, and a bfloat16 forward."""
    pytest.importorskip("transformers.integrations.moe")
    import sparsemoe.hf  # noqa: F401  (registers "sparsemoe")
    from sparsemoe.hf.families import experts_families, random_model

    model = random_model(experts_families()[family]).cuda()
    ids = torch.randint(0, 256, (2, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    out, grads = {}, {}
    for implementation in ("eager", "sparsemoe"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        y = model(input_ids=ids).logits
        (y * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        out[implementation] = y.detach()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out["sparsemoe"], out["eager"], atol=1e-4, rtol=1e-4)
    for name, grad in grads["eager"].items():
        err = ((grads["sparsemoe"][name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-3, name
    model.to(torch.bfloat16).set_experts_implementation("sparsemoe")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
