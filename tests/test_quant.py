"""Quantized experts: schemes, the native kernels against dequantize-then-matmul, every backend, models,
checkpoints and the `sparsemoe quantize` command."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemoe.config import MoEConfig
from sparsemoe.dispatch import backend_names
from sparsemoe.experts import Experts
from sparsemoe.layer import MoE
from sparsemoe.ops import cpu_kernels
from sparsemoe.quant import (
    QuantizationError,
    QuantizedExperts,
    QuantizedSharedExperts,
    QuantScheme,
    dequantize_weight,
    quantize,
    quantize_weight,
)
from sparsemoe.quant.schemes import pack_int4, unpack_int4

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def _float_twin(quantized: torch.nn.Module, original: torch.nn.Module) -> torch.nn.Module:
    """`original` with every expert weight replaced by its quantized version's dequantization: the
    reference a quantized model must match up to float rounding."""
    twin = copy.deepcopy(original)
    q_modules = dict(quantized.named_modules())
    for name, module in twin.named_modules():
        q = q_modules.get(name)
        if isinstance(q, QuantizedExperts):
            with torch.no_grad():
                module.w_in.copy_(q.w_in.dequantize(torch.float32))
                module.w_out.copy_(q.w_out.dequantize(torch.float32))
    return twin


# --- schemes ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 3), O=st.integers(1, 9), K=st.integers(1, 150), scheme=st.sampled_from(SCHEMES))
def test_round_trip_error(E, O, K, scheme):
    """int8: every weight within half a step of its value. int4: each group's squared error at most that of
    plain rounding with the scale max|w| / 7 (which clips nothing), computed here from the definition."""
    spec = QuantScheme.make(*scheme)
    w = torch.randn(E, O, K) * torch.rand(E, O, 1) * 3
    data, scale = quantize_weight(w, spec)
    back = dequantize_weight(data, scale, spec, K)
    assert back.shape == w.shape
    if spec.name == "int8":
        assert ((back - w).abs() <= scale[..., None] / 2 * (1 + 1e-6) + 1e-12).all()
        return
    G, Kp = spec.group_size, spec.padded(K)
    groups = torch.nn.functional.pad(w, (0, Kp - K)).view(E, O, -1, G)
    plain_scale = (groups.abs().amax(dim=3) / 7).to(torch.bfloat16).float()[..., None]
    plain = (torch.round(groups / plain_scale).clamp(-8, 7) * plain_scale - groups).square().sum(dim=3)
    ours = torch.nn.functional.pad(back - w, (0, Kp - K)).view(E, O, -1, G).square().sum(dim=3)
    assert (ours <= plain * (1 + 1e-5) + 1e-12).all()
    assert (scale.float() > 0).all()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_int4_pack_layout(rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (rows, 32 * blocks), generator=g, dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (rows, 16 * blocks)
    assert torch.equal(unpack_int4(packed), u)
    # The documented layout: byte 16c + j = column 32c + j (low bits) | column 32c + 16 + j (high bits).
    assert int(packed[0, 0]) == int(u[0, 0]) | int(u[0, 16]) << 4


def test_zero_rows_and_bad_input():
    for name, group in SCHEMES:
        spec = QuantScheme.make(name, group)
        data, scale = quantize_weight(torch.zeros(1, 2, 40), spec)
        assert (scale > 0).all() and torch.equal(dequantize_weight(data, scale, spec, 40), torch.zeros(1, 2, 40))
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_weight(torch.tensor([[[1.0, float("nan")]]]), QuantScheme.make("int8"))
    for bad in (0, 48, -32, 33):
        with pytest.raises(QuantizationError, match="multiple of 32"):
            QuantScheme.make("int4", bad)
    with pytest.raises(QuantizationError, match="no group size"):
        QuantScheme.make("int8", 32)
    with pytest.raises(QuantizationError, match="unknown quantization scheme"):
        QuantScheme.make("int2")


@pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable (no C compiler)")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dequantize_is_exact(scheme, dtype):
    spec = QuantScheme.make(*scheme)
    w = torch.randn(3, 7, 131)
    data, scale = quantize_weight(w, spec)
    expected = dequantize_weight(data, scale, spec, 131, dtype)
    got = cpu_kernels.dequantize(data, scale, spec.name, spec.group_size, 131, dtype)
    assert torch.equal(got, expected)


# --- the layer: kernel and every backend against dequantize-then-matmul -------------------------------


@pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable (no C compiler)")
def test_kernel_refuses_stored_tensors_that_do_not_fit():
    """The C kernel reads as many bytes as the shapes say: anything else is refused before it runs."""
    q = QuantizedExperts.from_experts(Experts(4, 40, 24, "swiglu"), QuantScheme.make("int4", 32))
    args = (torch.randn(1, 40), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.tensor([2, 2, 2, 2]))
    good_in, good_out = (q.w_in.data, q.w_in.scale), (q.w_out.data, q.w_out.scale)
    cpu_kernels.decode_mlp_quantized(*args, good_in, good_out, "int4", 32, 24, "swiglu")
    for w_in, w_out, group in (
        ((q.w_in.data[:, :10], q.w_in.scale), good_out, 32),  # too few rows
        (good_in, (q.w_out.data, q.w_out.scale.float()), 32),  # scales of another dtype
        (good_in, good_out, 64),  # another group size than stored
    ):
        with pytest.raises(ValueError, match="do not fit"):
            cpu_kernels.decode_mlp_quantized(*args, w_in, w_out, "int4", group, 24, "swiglu")


def _rounds_activations(scheme, rows: int) -> bool:
    """Whether the kernel rounds the activations of an expert with `rows` rows to int8 (the VNNI path)."""
    vnni_scheme = scheme[0] == "int8" or scheme[1] % 64 == 0
    return cpu_kernels.activations_int8() and vnni_scheme and rows <= 8


@settings(max_examples=80, deadline=None)
@given(
    D=st.integers(1, 150), F=st.integers(1, 120), E=st.integers(1, 6), K=st.integers(1, 3), T=st.integers(1, 40),
    scheme=st.sampled_from(SCHEMES), activation=st.sampled_from(["swiglu", "geglu", "relu", "gelu"]),
    bf16=st.booleans(), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_kernel_matches_its_definition(D, F, E, K, T, scheme, activation, bf16, seed):
    """The native quantized kernel against dequantize-then-matmul written out per token in float64, over odd
    shapes, both weight formats, float32 and bfloat16 inputs, and every row count up to 40 per expert (the
    int4 tile path starts past 8). Where the kernel takes its VNNI path (int8, and int4 with groups of 64k
    columns, up to 8 rows per expert, AVX-512 VNNI), the definition rounds each activation row (x, then
    act(h)) to int8 per group (`cpu_kernels.quantize_activations`); float rounding is all that remains."""
    from sparsemoe.dispatch.plan import plan_from_topk
    from sparsemoe.experts import activate
    from sparsemoe.quant.experts import kernel_forward

    torch.manual_seed(seed)
    K = min(K, E)
    dtype = torch.bfloat16 if bf16 else torch.float32
    experts = QuantizedExperts.from_experts(Experts(E, D, F, activation).to(dtype), QuantScheme.make(*scheme))
    x = (torch.randn(T, D) * torch.rand(T, 1) * 4).to(dtype)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K)
    plan = plan_from_topk(ids, weights, E)
    with torch.no_grad():
        y = kernel_forward(x, plan.token_ids, plan.weights, plan.offsets, experts)
    w_in, w_out = experts.w_in.dequantize(torch.float64), experts.w_out.dequantize(torch.float64)
    group = scheme[1] or cpu_kernels.INT8_ACTIVATION_GROUP
    rows = torch.bincount(ids.flatten(), minlength=E)

    def kernel_input(v, width, e):  # the row as the kernel multiplies it: rounded on the VNNI path
        if not _rounds_activations(scheme, int(rows[e])):
            return v.double()
        padded = torch.nn.functional.pad(v[None].float(), (0, -(-width // group) * group - width))
        return cpu_kernels.quantize_activations(padded, group)[0, :width].double()

    expected = torch.zeros(T, D, dtype=torch.float64)
    # The kernel's h is float32 summed in its own order, so an element of act(h) that sits on a rounding
    # boundary may round one int8 step the other way than here: allowed, twice per token and expert.
    slack = torch.zeros(T, 1, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            a = activate((w_in[e] @ kernel_input(x[t], D, e)).float(), activation)
            expected[t] += weights[t, j].double() * (w_out[e] @ kernel_input(a, F, e))
            if _rounds_activations(scheme, int(rows[e])):
                slack[t] += 2 * weights[t, j].double() * w_out[e].abs().max() * a.abs().max().double() / 127
    tolerance = 1e-4 * expected.abs().max().item() + 1e-6 + slack
    assert ((y.double() - expected).abs() <= tolerance + 1e-4 * expected.abs()).all()


@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_from_the_routers_choices_is_the_kernel_from_the_plan(scheme, dtype):
    """A decode step's quantized experts straight from the top-k choices (rows grouped inside the call) give
    the plan path's result bit for bit: the same rows, in the same order, through the same kernel."""
    from sparsemoe.dispatch.plan import plan_from_topk
    from sparsemoe.quant.experts import kernel_forward, kernel_forward_choices

    torch.manual_seed(0)
    E, K = 6, 2
    experts = QuantizedExperts.from_experts(Experts(E, 70, 40, "swiglu").to(dtype), QuantScheme.make(*scheme))
    for T in (1, 3, 9):
        x = torch.randn(T, 70).to(dtype)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        weights = torch.rand(T, K)
        plan = plan_from_topk(ids, weights, E)
        with torch.no_grad():
            from_plan = kernel_forward(x, plan.token_ids, plan.weights, plan.offsets, experts)
            from_choices = kernel_forward_choices(x, ids.reshape(-1), weights.reshape(-1), K, experts)
        assert torch.equal(from_plan, from_choices)


@pytest.mark.parametrize("backend", [b for b in backend_names() if b != "triton"])
@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32)])
def test_every_backend_and_input_gradients(backend, scheme, native_kernels):
    layer = MoE(dim=40, hidden_dim=24, num_experts=5, top_k=2, num_shared_experts=1, shared_expert_gate=True)
    q = quantize(copy.deepcopy(layer), *scheme)
    q.config = MoEConfig(**{**q.config.__dict__, "backend": backend})
    reference = _float_twin(q, layer)
    reference.config = MoEConfig(**{**reference.config.__dict__, "backend": "reference"})
    for T in (1, 3, 37):
        x = torch.randn(2, T, 40, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, y_ref = q(x), reference(x_ref)
        assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # the inference path (the kernel for "auto"/"decode")
            rounds = _rounds_activations(scheme, 2 * T)  # the shared expert takes the kernel with any backend
            atol = 2e-2 * y_ref.abs().max().item() if rounds else 1e-5  # int8 activations on the VNNI path
            assert torch.allclose(q(x), y_ref, atol=atol, rtol=1e-4)


def test_quantized_layer_under_autocast():
    """Under bfloat16 autocast the quantized experts run in bfloat16 (kernel, expert by expert, and the
    dequantizing backends alike), close to the float layer on the dequantized weights."""
    layer = MoE(dim=40, hidden_dim=24, num_experts=4, top_k=2, num_shared_experts=1).eval()
    q = quantize(copy.deepcopy(layer), "int4", 32)
    reference = _float_twin(q, layer)
    for backend in ("auto", "grouped"):
        q.config = MoEConfig(**{**q.config.__dict__, "backend": backend})
        for T in (1, 300):
            x = torch.randn(T, 40)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = q(x)
            with torch.no_grad():
                y_ref = reference(x)
            assert torch.allclose(y.float(), y_ref, atol=3e-2 * y_ref.abs().max().item()), (backend, T)


def test_quantized_layer_compiles_fullgraph():
    """The kernel is an opaque custom op and the large-batch path dequantizes with tensor ops, so a quantized
    layer traces whole under torch.compile, decode and prefill sizes."""
    layer = MoE(dim=40, hidden_dim=24, num_experts=4, top_k=2, check_finite=False).eval()
    q = quantize(copy.deepcopy(layer), "int4", 32)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for T in (1, 300):
            x = torch.randn(T, 40)
            assert torch.allclose(compiled(x), q(x), atol=1e-5)


def test_quantized_error_is_bounded_per_scheme():
    """Relative error of a quantized layer's output against the float layer, random weights and inputs."""
    torch.manual_seed(1)
    layer = MoE(dim=256, hidden_dim=384, num_experts=8, top_k=2).eval()
    x = torch.randn(64, 256)
    with torch.no_grad():
        y = layer(x)
        errors = {
            f"{name}/{group}": ((quantize(copy.deepcopy(layer), name, group)(x) - y).norm() / y.norm()).item()
            for name, group in SCHEMES
        }
    assert errors["int8/None"] < 0.01
    # Uniformly initialised weights are int4's hard case (about 11% here; trained weights do better).
    assert errors["int4/32"] < errors["int4/128"] < 0.13


def test_quantize_model_in_place(tmp_path):
    from sparsemoe.model import ModelConfig, MoETransformer
    from sparsemoe.quant import quantization_of

    model = MoETransformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4,
                                       top_k=2, moe_hidden_dim=24, num_shared_experts=1)).eval()  # fmt: skip
    params = model.num_params()
    quantize(model, "int4", 32, shared=False)
    assert quantization_of(model) == {"scheme": "int4", "group_size": 32, "shared": False}
    layer = model.moe_layers[0]
    assert isinstance(layer.experts, QuantizedExperts) and not isinstance(layer.shared_experts, QuantizedExperts)
    assert model.num_params() < params  # expert weights are buffers now
    assert model.num_active_params() > 0
    with pytest.raises(QuantizationError, match="quantized already"):
        quantize(model, "int8")
    with pytest.raises(QuantizationError, match="holds no"):
        quantize(torch.nn.Linear(3, 3), "int8")
    with pytest.raises(RuntimeError, match="re-initialised"):
        layer.reset_parameters()


def test_shared_experts_kernel_and_dtype_moves():
    layer = MoE(dim=48, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=2, shared_expert_gate=True).eval()
    with torch.no_grad():
        layer.shared_experts.gate_weight.normal_()
    q = quantize(copy.deepcopy(layer), "int4", 32)  # groups of 32: the float path (no rounded activations)
    assert isinstance(q.shared_experts, QuantizedSharedExperts)
    reference = _float_twin(q, layer)
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert torch.allclose(q.shared_experts(x), reference.shared_experts(x), atol=1e-5)
        qb = quantize(copy.deepcopy(layer), "int8").to(torch.bfloat16)  # the compute dtype moves; scales do not
        assert qb.experts.w_in.scale.dtype == torch.float32 and qb.experts.dtype == torch.bfloat16
        assert qb(x.bfloat16()).dtype == torch.bfloat16


# --- transformers models through the sparsemoe experts implementation -----------------------------------


def test_transformers_experts_quantized():
    transformers = pytest.importorskip("transformers")
    import sparsemoe.hf  # noqa: F401  (registers the experts implementation and its quantizer)

    for config_cls, model_cls in (("MixtralConfig", "MixtralForCausalLM"), ("GptOssConfig", "GptOssForCausalLM")):
        config = getattr(transformers, config_cls)(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        )  # fmt: skip
        model = getattr(transformers, model_cls)(config).eval()
        with pytest.raises(QuantizationError, match="experts_implementation='sparsemoe'"):
            quantize(copy.deepcopy(model), "int8")  # eager experts cannot read quantized weights
        model.set_experts_implementation("sparsemoe")
        q = quantize(copy.deepcopy(model), "int4", 32)
        # The reference: transformers' own eager experts on the dequantized weights.
        reference = copy.deepcopy(model)
        reference.set_experts_implementation("eager")
        q_modules = dict(q.named_modules())
        for name, module in reference.named_modules():
            stored = q_modules[name]._modules.get("sparsemoe_quantized")
            if stored is None:
                continue
            in_name = "gate_up_proj" if hasattr(module, "gate_up_proj") else "up_proj"
            with torch.no_grad():
                for attr, weight in ((in_name, stored.w_in), ("down_proj", stored.w_out)):
                    target = getattr(module, attr)
                    value = weight.dequantize(torch.float32)
                    target.copy_(value.transpose(1, 2) if target.shape != value.shape else value)
        ids = torch.randint(0, 100, (2, 9))
        with torch.no_grad():
            assert torch.allclose(q(ids).logits, reference(ids).logits, atol=1e-4), config_cls
            assert torch.allclose(q(ids[:, :1]).logits, reference(ids[:, :1]).logits, atol=1e-4)


def test_patched_transformers_model_quantized():
    """A transformers model patched by `patch_hf_model` holds sparsemoe layers: quantize swaps their experts."""
    transformers = pytest.importorskip("transformers")
    from sparsemoe.hf import patch_hf_model

    config = transformers.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()
    patch_hf_model(model, backend="reference")
    q = quantize(copy.deepcopy(model), "int8")
    moes = [m for m in q.modules() if isinstance(m, MoE)]
    assert moes and all(isinstance(m.experts, QuantizedExperts) for m in moes)
    reference = _float_twin(q, model)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():  # the reference backend: the dequantized weights, no activation rounding
        assert torch.allclose(q(ids).logits, reference(ids).logits, atol=1e-5)


# --- checkpoints and the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from sparsemoe.cli import main

    path = tmp_path_factory.mktemp("quant") / "run"
    args = ["train", "--preset", "tiny", "--max-steps", "40", "--eval-interval", "40", "--no-progress",
            "--threads", "1", "--run-dir", str(path)]  # fmt: skip
    assert main(args) == 0
    return path


def _validation_loss(model):
    from sparsemoe.train.data import eval_batches, load_corpus

    batches = eval_batches(load_corpus(max_bytes=400_000).val, 8, model.config.max_seq_len, 4)
    with torch.no_grad():
        return sum(model(x, targets=y).loss.item() for x, y in batches) / len(batches)


@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32)])
def test_quantize_command_generate_and_loss(trained_run, tmp_path, scheme, capsys):
    from sparsemoe.cli import main
    from sparsemoe.model import generate
    from sparsemoe.train.checkpoint import load_model

    out = tmp_path / scheme[0]
    args = ["quantize", str(trained_run), str(out), "--to", scheme[0]]
    if scheme[1]:
        args += ["--group-size", str(scheme[1])]
    assert main(args) == 0
    meta = json.loads(next((out / "checkpoints").glob("step-*/trainer.json")).read_text())
    assert meta["quantization"]["scheme"] == scheme[0]
    float_model, _ = load_model(trained_run)
    q_model, _ = load_model(out)
    assert isinstance(q_model.moe_layers[0].experts, QuantizedExperts)
    twin = _float_twin(q_model, float_model)
    prompt = torch.tensor([10, 100, 101, 102, 32])
    tokens = generate(q_model, prompt, 24, temperature=0)
    assert torch.equal(tokens, generate(twin, prompt, 24, temperature=0))  # the kernel = its definition
    loss, q_loss = _validation_loss(float_model), _validation_loss(q_model)
    assert abs(q_loss - loss) / loss < (0.01 if scheme[0] == "int8" else 0.05)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert main(["inspect", "--checkpoint", str(out), "--windows", "2", "--max-bytes", "20000"]) == 0


def _error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sparsemoe {command}: error: "), err
    return err[0]


def test_quantized_checkpoint_validation(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sparsemoe.cli import main
    from sparsemoe.train.checkpoint import MODEL_FILE

    out = tmp_path / "q"
    assert main(["quantize", str(trained_run), str(out), "--to", "int4"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(trained_run), str(out), "--to", "int4"]) == 2
    assert "--overwrite" in _error(capsys, "quantize")
    assert main(["quantize", str(out), str(tmp_path / "again"), "--to", "int8"]) == 2
    assert "quantized already" in _error(capsys, "quantize")
    assert main(["quantize", str(trained_run), str(tmp_path / "g"), "--to", "int8", "--group-size", "32"]) == 2
    assert "int4 only" in _error(capsys, "quantize")
    assert main(["quantize", str(trained_run), str(tmp_path / "g"), "--to", "int4", "--group-size", "48"]) == 2
    assert "multiple of 32" in _error(capsys, "quantize")
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").rglob("*.safetensors"))

    ckpt = next((out / "checkpoints").glob("step-*"))
    state = load_file(str(ckpt / MODEL_FILE))
    key = next(k for k in state if k.endswith("experts.w_in.scale"))
    cases = {
        "missing": lambda s: s.pop(key),
        "shape mismatch": lambda s: s.__setitem__(key, s[key][:, :-1].contiguous()),
        "finite and positive": lambda s: s.__setitem__(key, -s[key]),
    }
    for expected, damage in cases.items():
        broken = tmp_path / f"broken-{expected.split()[0]}"
        damaged = dict(state)
        damage(damaged)
        target = broken / "checkpoints" / ckpt.name
        target.mkdir(parents=True)
        for f in ckpt.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        (broken / "checkpoints" / "latest").write_text(ckpt.name)
        save_file(damaged, str(target / MODEL_FILE))
        meta = json.loads((target / "trainer.json").read_text())
        meta["files"][MODEL_FILE] = (target / MODEL_FILE).stat().st_size  # damaged on purpose, not truncated
        (target / "trainer.json").write_text(json.dumps(meta))
        assert main(["generate", "--checkpoint", str(broken), "--no-verify", "--max-new-tokens", "2"]) == 2
        assert expected in _error(capsys, "generate")
    meta_path = ckpt / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["quantization"] = {"scheme": "int3"}
    meta_path.write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(out), "--no-verify", "--max-new-tokens", "2"]) == 2
    assert "unusable quantization entry" in _error(capsys, "generate")
    assert main(["train", "--run-dir", str(out), "--resume", "--no-verify", "--max-steps", "2", "--no-progress"]) == 2
    assert "quantized (inference only)" in _error(capsys, "train")


def test_bench_quant_reports_every_scheme(trained_run, tmp_path, capsys):
    from sparsemoe.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--quant", "--configs", "tiny", "--tokens", "1,16,128", "--model", "none", "--checkpoint",
            str(trained_run), "--repeats", "1", "--decode-tokens", "4", "--out", str(out), "--group-size", "32"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "quant.json").read_text())
    impls = {r["impl"] for r in result["layers"]}
    assert {"float32", "bfloat16", "int8", "int4"} <= impls
    if result["environment"]["torchao"]:
        assert "torchao int8" in impls
    assert {"float32", "bfloat16", "int8", "int4", "int4 + bfloat16"} <= {r["scheme"] for r in result["models"]}
    losses = {r["scheme"]: r["val_loss"] for r in result["loss"]}
    assert abs(losses["int8"] / losses["float32"] - 1) < 0.01
    assert all(r["bytes"] > 0 and r["min_ms"] > 0 for r in result["layers"])
    # int4 stores a quarter of float32's bytes and a little more (the group scales)
    rows = {(r["T"], r["impl"]): r for r in result["layers"]}
    assert 0.125 < rows[(1, "int4")]["bytes"] / rows[(1, "float32")]["bytes"] < 0.2
    assert "| tiny | 1 | int4 |" in (out / "quant.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--quant", "--group-size", "48", "--out", str(out)]) == 2
    assert "multiple of 32" in _error(capsys, "bench")
    assert main(["bench", "--checkpoint", str(trained_run), "--out", str(out)]) == 2
    assert "--quant" in _error(capsys, "bench")


def test_checkpoints_load_in_their_stored_dtype(trained_run, tmp_path, capsys):
    """`generate`/`inspect` with --dtype auto on the CPU run a checkpoint in the dtype it stores."""
    from sparsemoe.cli import main
    from sparsemoe.train.checkpoint import load_model

    assert main(["quantize", str(trained_run), str(tmp_path / "q"), "--to", "int8", "--dtype", "bfloat16"]) == 0
    model, _ = load_model(tmp_path / "q")
    assert model.embed.weight.dtype == torch.bfloat16 and model.moe_layers[0].experts.dtype == torch.bfloat16
    assert load_model(trained_run)[0].embed.weight.dtype == torch.float32
    assert load_model(tmp_path / "q", dtype=torch.float32)[0].embed.weight.dtype == torch.float32
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--max-new-tokens", "3", "--temperature", "0"]) == 0


def test_checkpoint_round_trip_keeps_float_shared_experts(tmp_path):
    """A model quantized with shared=False saves and loads with its shared experts float, computing the same."""
    from sparsemoe.experts import SharedExperts
    from sparsemoe.model import ModelConfig, MoETransformer
    from sparsemoe.quant import quantization_of
    from sparsemoe.hf.convert import save_converted_checkpoint
    from sparsemoe.train.checkpoint import load_model

    model = MoETransformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4,
                                       top_k=2, moe_hidden_dim=24, num_shared_experts=1)).eval()  # fmt: skip
    quantize(model, "int4", 32, shared=False)
    save_converted_checkpoint(model, tmp_path / "run", {"quantization": quantization_of(model)})
    loaded, meta = load_model(tmp_path / "run")
    assert meta["quantization"] == {"scheme": "int4", "group_size": 32, "shared": False}
    layer = loaded.moe_layers[0]
    assert isinstance(layer.experts, QuantizedExperts) and type(layer.shared_experts) is SharedExperts
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
