"""The trainer, data, checkpoints and report, on the tiny preset and a slice of real text."""

import json
import math
import os

import pytest
import torch

from sparsemoe import moe_layers
from sparsemoe.model import MoETransformer, preset
from sparsemoe.train import (
    CheckpointError,
    DataError,
    RandomBatches,
    TrainConfig,
    Trainer,
    build_optimizer,
    eval_batches,
    load_checkpoint,
    load_corpus,
    load_model,
    lr_factor,
)
from sparsemoe.train.checkpoint import META_FILE, MODEL_FILE, resolve_checkpoint
from sparsemoe.train.report import write_report

SLICE = 120_000  # bytes of the standard-library corpus used by these tests


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, max_bytes=SLICE)


def make_trainer(corpus, run_dir=None, model_overrides=None, **train_overrides):
    cfg = TrainConfig(
        **{
            **dict(
                max_steps=30,
                batch_size=8,
                seq_len=32,
                lr=3e-3,
                warmup_steps=3,
                eval_interval=10,
                eval_batches=2,
                log_interval=1,
                checkpoint_interval=10,
            ),
            **train_overrides,
        }
    )
    torch.manual_seed(cfg.seed)
    model = MoETransformer(preset("tiny", **(model_overrides or {})))
    batches = RandomBatches(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    meta = {"model_config": model.config.to_dict()}
    return Trainer(model, build_optimizer(model, cfg), cfg, batches, val, run_dir, meta=meta, progress=False)


def train_losses(trainer):
    return [r["loss"] for r in trainer.metrics.records if r["event"] == "train"]


# --- data -------------------------------------------------------------------------------------------------


def test_default_corpus_is_real_deterministic_and_split(corpus):
    again = load_corpus(None, max_bytes=SLICE)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.num_files > 1 and corpus.val.numel() > 0 and corpus.train.numel() > corpus.val.numel()
    text = bytes(corpus.train[:20000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import" in text


def test_data_paths(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# more text\n" * 200)
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG\0\0binary")
    (tmp_path / ".hidden").write_text("skipped")
    folder = load_corpus(str(tmp_path))
    assert folder.num_files == 2 and folder.num_bytes == 2400 + 2400
    single = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.25)
    assert single.val.numel() == 600
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "blob.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="no text files"):
        load_corpus(str(tmp_path / "nothing"))


def test_random_batches_are_shifted_windows_and_replayable(corpus):
    batches = RandomBatches(corpus.train, 4, 16, seed=5)
    state = batches.state_dict()
    x, y = next(batches)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches.load_state_dict(state)
    x2, _ = next(batches)
    assert torch.equal(x, x2)


# --- schedule and optimizer ---------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_optimizer_groups_and_expert_lr_mult(corpus):
    trainer = make_trainer(corpus, expert_lr_mult=0.5, max_steps=1)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["no_decay"]["weight_decay"] == 0.0
    expert_params = {id(layer.experts.w_in) for layer in trainer.model.moe_layers}
    assert expert_params <= {id(p) for p in groups["experts"]["params"]}
    trainer.train_step()
    assert groups["experts"]["lr"] == pytest.approx(0.5 * groups["decay"]["lr"])


def test_invalid_train_config():
    with pytest.raises(ValueError, match="TrainConfig.accum_steps=0"):
        TrainConfig(accum_steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)


# --- training -------------------------------------------------------------------------------------------


def test_tiny_model_loss_falls_on_real_text(corpus):
    trainer = make_trainer(corpus, max_steps=40)
    summary = trainer.fit()
    losses = train_losses(trainer)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.5  # near ln(256) = 5.55 at the start
    assert last < first - 1.5, (first, last)
    assert summary["val_loss"] < 4.5
    record = trainer.metrics.records[-2]
    assert record["event"] == "train" and len(record["expert_load"]) == 2
    assert sum(record["expert_load"][0]) == pytest.approx(1.0, abs=1e-4)
    assert record["load_imbalance"] >= 1.0


def test_aux_modes_agree_under_accumulation(corpus):
    """Inject (scaled by set_aux_loss_scale) and return mode take the same step with accum_steps=2."""
    states = {}
    for mode in ("inject", "return"):
        trainer = make_trainer(
            corpus, max_steps=1, accum_steps=2, model_overrides={"aux_loss_mode": mode, "aux_loss_coef": 0.5}
        )
        trainer.train_step()
        states[mode] = trainer.model.state_dict()
    for name, value in states["inject"].items():
        torch.testing.assert_close(value, states["return"][name], rtol=1e-4, atol=1e-6)


def test_the_trainer_moves_step_mode_biases_once_per_optimizer_step(corpus):
    """bias_update="step": one update per optimizer step from all its micro-batches (so each bias entry moves
    by exactly one rate step or not at all), and nothing left counted afterwards."""
    rate = 0.01
    overrides = {"bias_balancing": True, "bias_update": "step", "bias_update_rate": rate}
    trainer = make_trainer(corpus, None, overrides, accum_steps=3)
    trainer.train_step()
    for layer in moe_layers(trainer.model):
        steps = layer.router.expert_bias / rate
        assert torch.allclose(steps, steps.round()) and steps.abs().max() == 1 and steps.abs().sum() > 0
        assert torch.all(layer.router.pending_load == 0)


def test_activation_checkpointing_trains_like_the_plain_trainer(corpus):
    overrides = {"dropout": 0.1, "noise": "jitter", "bias_balancing": True, "bias_update": "step"}
    plain = make_trainer(corpus, None, overrides, max_steps=4)  # each seeds the global RNG: run one, then the other
    want = [plain.train_step()["loss"] for _ in range(4)]
    checkpointed = make_trainer(corpus, None, overrides, max_steps=4, activation_checkpointing=True)
    assert checkpointed.model.activation_checkpointing and not plain.model.activation_checkpointing
    assert [checkpointed.train_step()["loss"] for _ in range(4)] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs bias_update='step'"):
        make_trainer(corpus, None, {"bias_balancing": True}, activation_checkpointing=True)


@pytest.mark.slow
def test_activation_checkpointing_under_compile(corpus):
    """The compiled model with checkpointed blocks (the MoE layers' side effects are not replayed)."""
    torch._dynamo.reset()
    overrides = {"bias_balancing": True, "bias_update": "step"}
    plain = make_trainer(corpus, None, overrides, max_steps=2)
    want = [plain.train_step()["loss"] for _ in range(2)]
    compiled = make_trainer(corpus, None, overrides, max_steps=2, activation_checkpointing=True, compile=True)
    assert [compiled.train_step()["loss"] for _ in range(2)] == pytest.approx(want, rel=1e-4)
    for a, b in zip(moe_layers(plain.model), moe_layers(compiled.model)):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)


def test_resume_gives_the_same_losses(corpus, tmp_path):
    """Stop at step 10, resume, and get exactly the losses of an uninterrupted 20-step run.

    Dropout, router jitter and bias balancing make the check cover the RNG state and the router bias.
    """
    model_overrides = {"dropout": 0.1, "noise": "jitter", "bias_balancing": True}
    full = make_trainer(corpus, tmp_path / "full", model_overrides, max_steps=20)
    full.fit()
    first = make_trainer(corpus, tmp_path / "split", model_overrides, max_steps=20)

    def interrupt(record):  # what the Ctrl-C handler does: finish the step, save, stop
        if record["step"] == 10:
            first.stop_requested = True

    first.on_log.append(interrupt)
    assert first.fit()["stopped_early"]
    torch.manual_seed(1234)  # the resumed run must not depend on the state of the process
    resumed = make_trainer(corpus, tmp_path / "split", model_overrides, max_steps=20, seed=0)
    resumed.resume(tmp_path / "split")
    assert resumed.step == 10
    resumed.fit()
    split_losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert len(split_losses) == 20
    assert split_losses == train_losses(full)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_bf16_training_step(corpus):
    """precision="bf16" trains under bfloat16 autocast: close to float32, not equal to it."""
    bf16, fp32 = make_trainer(corpus, max_steps=2, precision="bf16"), make_trainer(corpus, max_steps=2)
    assert (bf16.precision, fp32.precision) == ("bf16", "fp32")  # "auto" is fp32 on the CPU
    bf16.fit()
    fp32.fit()
    assert all(math.isfinite(x) for x in train_losses(bf16))
    assert train_losses(bf16) != train_losses(fp32)
    assert train_losses(bf16) == pytest.approx(train_losses(fp32), rel=2e-2)


def _set_fused(trainer, fused):
    """The optimizer implementation a run on another device would use (CUDA: fused AdamW)."""
    for group in trainer.optimizer.param_groups:
        group["fused"] = fused
    return trainer


@pytest.mark.parametrize("first, second", [(True, None), (None, True)])
def test_resume_across_optimizer_implementations(corpus, tmp_path, first, second):
    """A checkpoint of fused AdamW resumes with the for-each AdamW (of an older run) and the other
    way round: the resumed optimizer keeps its own implementation, its step counts come in the form it
    needs, and the losses are those of an uninterrupted run up to the implementations' rounding."""
    want = train_losses(_fit(make_trainer(corpus, max_steps=8)))
    _fit(_set_fused(make_trainer(corpus, tmp_path, max_steps=8, checkpoint_interval=4), first), stop_at=4)
    resumed = _set_fused(make_trainer(corpus, tmp_path, max_steps=8), second)
    resumed.resume(tmp_path)
    assert all(group["fused"] == second for group in resumed.optimizer.param_groups)
    resumed.fit()
    assert resumed.step == 8 and train_losses(resumed) == pytest.approx(want, rel=1e-5)


def _fit(trainer, stop_at=None):
    if stop_at is not None:
        trainer.on_log.append(lambda record: setattr(trainer, "stop_requested", record["step"] == stop_at))
    trainer.fit()
    return trainer


def test_the_cpu_runs_fused_adamw():
    model = MoETransformer(preset("tiny"))
    assert all(group["fused"] is True for group in build_optimizer(model, TrainConfig()).param_groups)


def test_mfu_is_reported_where_the_peak_is_known(corpus):
    """MFU = tokens/s x model FLOPs per token / peak, in every log record and the summary; with no peak,
    no MFU (the CPU's is never assumed)."""
    trainer = make_trainer(corpus, max_steps=3)
    trainer.flops_per_token, trainer.peak_tflops = 2e6, 1e-3  # a 1 GFLOP/s device
    summary = trainer.fit()
    records = [r for r in trainer.metrics.records if r["event"] == "train"]
    assert len(records) == 3 and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 2e6 / 1e9) for r in records)
    assert summary["mfu"] == pytest.approx(summary["train_tokens_per_s"] * 2e6 / 1e9)
    assert summary["train_tokens_per_s"] >= summary["tokens_per_s"]  # validation and the first step left out
    plain = make_trainer(corpus, max_steps=2).fit()
    assert "mfu" not in plain and "peak_memory_bytes" not in plain


def test_checkpoints_before_precision_keep_their_bf16_flag():
    assert TrainConfig.from_dict({"bf16": True}).precision == "bf16"
    assert TrainConfig.from_dict({"bf16": False}).precision == "fp32"
    assert TrainConfig.from_dict({}).precision == "auto"
    assert TrainConfig.from_dict({"bf16": True, "precision": "auto"}).precision == "auto"


# --- checkpoints -------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_atomicity(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_steps=4, checkpoint_interval=2)
    trainer.fit()
    ckpt_dir = resolve_checkpoint(tmp_path)
    assert ckpt_dir.name == "step-000004"
    model, meta = load_model(tmp_path)
    assert meta["step"] == 4 and not model.training
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name])
    assert torch.equal(model.rope_cos, trainer.model.rope_cos)  # not saved: recomputed on load
    half, _ = load_model(tmp_path, "cpu", torch.bfloat16)  # weights cast on load, selection bias float32
    assert half.embed.weight.dtype == torch.bfloat16 and half.rope_cos.dtype == torch.float32
    assert {layer.router.expert_bias.dtype for layer in half.moe_layers} == {torch.float32}
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits.float(), model(ids).logits, atol=0.1, rtol=0.05)
    # A save killed half-way leaves a temporary folder that nothing points to.
    (tmp_path / "checkpoints" / ".tmp-step-000006-99999").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000006-99999" / MODEL_FILE).write_bytes(b"partial")
    assert resolve_checkpoint(tmp_path) == ckpt_dir
    assert load_checkpoint(tmp_path)["optimizer"]["state"]


def test_truncated_and_corrupt_checkpoints_are_reported(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_steps=2)
    trainer.fit()
    ckpt = resolve_checkpoint(tmp_path)
    data = (ckpt / MODEL_FILE).read_bytes()
    (ckpt / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)
    meta = json.loads((ckpt / META_FILE).read_text())
    meta["files"] = {}  # without recorded sizes (and checksums), safetensors itself must catch the short file
    (ckpt / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trainer.json' does not match its checksum"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path, verify=False)
    (ckpt / META_FILE).write_text('{"format": "sparsemoe-chec')
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path, verify=False)


def test_checkpoint_from_another_config_is_refused(corpus, tmp_path):
    make_trainer(corpus, tmp_path, max_steps=2).fit()
    other = make_trainer(corpus, None, {"dim": 48, "n_heads": 3}, max_steps=2)
    with pytest.raises(CheckpointError, match="does not match this model config"):
        other.resume(tmp_path)


def test_report_files(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_steps=10)
    trainer.fit()
    report = write_report(tmp_path, {"title": "tiny", "rows": {"model": "tiny"}}, trainer.model.config.moe_layer_ids)
    text = report.read_text()
    assert "final validation loss" in text and "expert_load.png" in text
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.slow
def test_compiled_training_matches_eager(corpus):
    """torch.compile changes the speed, not the numbers (to float tolerance)."""
    eager = make_trainer(corpus, max_steps=3)
    eager.fit()
    compiled = make_trainer(corpus, max_steps=3, compile=True)
    compiled.fit()
    for a, b in zip(train_losses(eager), train_losses(compiled)):
        assert a == pytest.approx(b, rel=1e-4)
