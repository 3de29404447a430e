"""The Triton kernels under the Triton interpreter on the CPU, against the reference backend.

Triton decides at import time whether kernels are compiled or interpreted, so these tests need a process
that started with TRITON_INTERPRET=1. `tests/test_kernels.py` runs this file in such a subprocess; run it
by hand with `TRITON_INTERPRET=1 python -m pytest tests/test_kernels_interp.py -q`. In any other process
the whole module skips (the kernels there are compiled for the GPU and cannot take CPU tensors).
Shapes are tiny and deliberately odd (D, F not powers of two, experts with no rows, several row blocks
per expert, partial K blocks) so that every masked path runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from sparsemoe import kernels  # noqa: E402

if not kernels.INTERPRET:
    pytest.skip("needs a process started with TRITON_INTERPRET=1 (tests/test_kernels.py starts one)", allow_module_level=True)

from sparsemoe import MoE, MoEConfig  # noqa: E402
from sparsemoe.dispatch import build_plan, resolve_backend  # noqa: E402
from sparsemoe.dispatch import triton_backend as tb  # noqa: E402
from sparsemoe.dispatch.reference import reference_forward  # noqa: E402
from sparsemoe.experts import Experts  # noqa: E402
from sparsemoe.routing import RoutingResult, token_choice  # noqa: E402


def _pair(cfg: MoEConfig, dtype=torch.float32) -> tuple[MoE, MoE]:
    torch.manual_seed(0)
    ref = MoE(MoEConfig(**{**cfg.to_dict(), "backend": "reference"}), dtype=dtype)
    tri = MoE(MoEConfig(**{**cfg.to_dict(), "backend": "triton"}), dtype=dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _run(model: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.float() * grad_out).sum().backward()
    out = {"y": y.detach().float(), "x.grad": x.grad.float()}
    # torch.compile wraps the module: strip its "_orig_mod." prefix so names compare across the two.
    out.update({f"{n.removeprefix('_orig_mod.')}.grad": p.grad.float() for n, p in model.named_parameters()})
    return out


def _assert_close(got: dict, want: dict, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "gelu"])
def test_layer_matches_reference_on_output_and_every_gradient(activation):
    # D=20, F=24: not powers of two, F > BLOCK_N and D > BLOCK_K with a partial block.
    cfg = MoEConfig(dim=20, hidden_dim=24, num_experts=5, top_k=2, activation=activation, aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    x = torch.randn(3, 7, 20)
    g = torch.randn(3, 7, 20)
    got, want = _run(tri, x, g), _run(ref, x, g)
    assert set(want) == {"y", "x.grad", "router.weight.grad", "experts.w_in.grad", "experts.w_out.grad"}
    _assert_close(got, want)


def test_several_row_blocks_per_expert_and_partial_k_blocks():
    # 40 tokens * top-3 over 3 experts: ~40 rows per expert (3 blocks of 16); D=37 leaves a partial K block.
    cfg = MoEConfig(dim=37, hidden_dim=19, num_experts=3, top_k=3, aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    x, g = torch.randn(40, 37), torch.randn(40, 37)
    _assert_close(_run(tri, x, g), _run(ref, x, g))


@pytest.mark.parametrize("E,K,T", [(1, 1, 1), (6, 2, 1), (6, 3, 2)])
def test_decode_sized_batches(E, K, T):
    cfg = MoEConfig(dim=24, hidden_dim=20, num_experts=E, top_k=K, aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    x, g = torch.randn(T, 24), torch.randn(T, 24)
    _assert_close(_run(tri, x, g), _run(ref, x, g))


def test_capacity_drops_rows_and_matches_reference():
    cfg = MoEConfig(dim=20, hidden_dim=16, num_experts=4, top_k=2, capacity_factor=0.5, aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    x, g = torch.randn(24, 20), torch.randn(24, 20)
    got = _run(tri, x, g)
    assert tri.stats.dropped_fraction.item() > 0  # the case really drops rows
    _assert_close(got, _run(ref, x, g))


def test_expert_choice_routing_matches_reference():
    cfg = MoEConfig(dim=18, hidden_dim=20, num_experts=4, top_k=2, router="expert_choice", aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    x, g = torch.randn(12, 18), torch.randn(12, 18)
    _assert_close(_run(tri, x, g), _run(ref, x, g))


def _explicit_plan(expert_ids_TK: torch.Tensor, num_experts: int, capacity=None, weights=None):
    """A plan from chosen expert ids, with leaf combine weights so their gradient can be compared."""
    T, K = expert_ids_TK.shape
    weights = (torch.rand(T * K) if weights is None else weights.detach().clone()).requires_grad_()
    routing = RoutingResult(
        token_ids=torch.arange(T).repeat_interleave(K),
        expert_ids=expert_ids_TK.reshape(-1),
        weights=weights,
        probs=torch.full((T, num_experts), 1.0 / num_experts),
        logits=torch.zeros(T, num_experts),
        top_k=K,
        expert_choice=False,
    )
    return build_plan(routing, capacity), weights


@pytest.mark.parametrize("capacity", [None, 3])
def test_plan_weights_gradient_with_empty_experts(capacity):
    # Experts 0, 2 and 5 get no rows at all; with capacity 3, expert 1 and 3 also drop rows.
    E, T, D, F = 6, 9, 21, 17
    ids = torch.tensor([[1, 3], [4, 1], [3, 4], [1, 3], [1, 4], [3, 1], [4, 3], [1, 4], [3, 1]])
    torch.manual_seed(1)
    experts = Experts(E, D, F, "swiglu")
    x = torch.randn(T, D)
    grad_out = torch.randn(T, D)
    combine = torch.rand(T * 2)
    results = []
    for forward in (reference_forward, tb.triton_forward):
        plan, weights = _explicit_plan(ids, E, capacity, combine)
        x_leaf = x.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        y = forward(x_leaf, plan, experts)
        (y * grad_out).sum().backward()
        results.append(
            {"y": y.detach(), "x": x_leaf.grad, "weights": weights.grad, "w_in": experts.w_in.grad, "w_out": experts.w_out.grad}
        )
    want, got = results
    if capacity is not None:
        assert (plan.expert_ids == E).any()  # some rows were dropped
    for e in (0, 2, 5):
        assert got["w_in"][e].abs().max() == 0 and got["w_out"][e].abs().max() == 0
    _assert_close(got, want)


def test_bfloat16_error_is_that_of_the_reference():
    """bf16 kernels (fp32 accumulation) are no further from the float32 truth than the bf16 reference."""
    cfg = MoEConfig(dim=20, hidden_dim=24, num_experts=4, top_k=2, aux_loss_coef=0.0)
    ref, tri = _pair(cfg, torch.bfloat16)
    truth = MoE(MoEConfig(**{**cfg.to_dict(), "backend": "reference"}))
    truth.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x, g = torch.randn(10, 20).bfloat16(), torch.randn(10, 20)
    exact = _run(truth, x.float(), g)
    bf16_ref, bf16_tri = _run(ref, x, g), _run(tri, x, g)
    for name, value in exact.items():
        scale = value.abs().max()
        ref_err = (bf16_ref[name] - value).abs().max() / scale
        tri_err = (bf16_tri[name] - value).abs().max() / scale
        assert tri_err <= 2 * ref_err + 1e-2, f"{name}: triton {tri_err:.4f} vs reference {ref_err:.4f}"


def test_recomputing_the_hidden_activations_in_backward_gives_the_same_gradients():
    cfg = MoEConfig(dim=20, hidden_dim=24, num_experts=5, top_k=2, aux_loss_coef=0.0)
    ref, tri = _pair(cfg)
    tri.experts.recompute_activations = True  # the Experts attribute the dispatch backends read
    x, g = torch.randn(11, 20), torch.randn(11, 20)
    _assert_close(_run(tri, x, g), _run(ref, x, g))


def test_dropout_in_training_falls_back_to_grouped_path():
    cfg = MoEConfig(dim=16, hidden_dim=16, num_experts=4, top_k=2, dropout=0.5, aux_loss_coef=0.0, backend="triton")
    torch.manual_seed(0)
    model = MoE(cfg).train()
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    y_tri = model(x)
    model.config = MoEConfig(**{**cfg.to_dict(), "backend": "grouped"})
    torch.manual_seed(3)
    torch.testing.assert_close(y_tri, model(x))


def test_backend_selection_under_the_interpreter():
    x = torch.randn(4, 8)
    plan, _ = _explicit_plan(torch.tensor([[0, 1]] * 4), 2)
    assert tb.available(x) and not tb.available(x.double())
    assert resolve_backend("auto", x, plan).name == "triton"
    with pytest.raises(ValueError, match="cannot run on cpu/torch.float64"):
        resolve_backend("triton", x.double(), plan)


# --- weight-gradient kernel on its own: empty groups, both gathers, scale ------------------------------------


def test_weight_gradient_kernel_gathers_scales_and_zeroes_empty_groups():
    torch.manual_seed(2)
    N, O, I, T = 11, 19, 23, 7
    counts = torch.tensor([0, 5, 0, 4, 0])  # 2 trailing rows are "dropped": past offsets[-1]
    offsets = counts.cumsum(0)
    g, x = torch.randn(T, O), torch.randn(N, I)
    g_index = torch.randint(0, T, (N,))
    scale = torch.rand(N)
    dw = kernels.weight_gradient(g, x, offsets, N, g_index_N=g_index, scale_N=scale)
    bounds = [0, *offsets.tolist()]
    for e in range(5):
        rows = slice(bounds[e], bounds[e + 1])
        want = (g[g_index[rows]] * scale[rows, None]).t() @ x[rows]
        torch.testing.assert_close(dw[e], want, atol=1e-5, rtol=1e-5)


# --- fused router --------------------------------------------------------------------------------------------


ROUTER_CASES = [
    dict(score_func="softmax", score_order="before_topk", renormalize=True),
    dict(score_func="softmax", score_order="before_topk", renormalize=False, route_scale=2.5),
    dict(score_func="softmax", score_order="before_topk", renormalize=True, bias_balancing=True),
    dict(score_func="softmax", score_order="after_topk", bias_balancing=True),
    dict(score_func="sigmoid", score_order="before_topk", renormalize=True, bias_balancing=True),
    dict(score_func="sigmoid", score_order="before_topk", renormalize=False),
    dict(score_func="softmax", score_order="after_topk"),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("E,K", [(6, 2), (24, 5)])
def test_fused_router_matches_token_choice(case, E, K):
    cfg = MoEConfig(dim=8, num_experts=E, top_k=K, **case)
    torch.manual_seed(E + K)
    T = 19  # more than one 16-token block, the last one partial
    logits = torch.randn(T, E, dtype=torch.float32)
    bias = torch.randn(E) * 0.1 if cfg.bias_balancing else None
    lg_ref = logits.clone().requires_grad_()
    want = token_choice(lg_ref, cfg, training=False, bias_E=bias)
    lg = logits.clone().requires_grad_()
    ids, weights = tb.fused_topk(lg, K, cfg.score_func, cfg.score_order, cfg.renormalize, cfg.route_scale, bias)
    torch.testing.assert_close(ids.reshape(-1), want.expert_ids)
    torch.testing.assert_close(weights.reshape(-1), want.weights)
    dw = torch.randn(T * K)
    (weights.reshape(-1) * dw).sum().backward()
    (want.weights * dw).sum().backward()
    torch.testing.assert_close(lg.grad, lg_ref.grad, atol=1e-6, rtol=1e-5)


# --- compilation and op registration ---------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    T, D, F, E = 6, 20, 16, 4
    experts = Experts(E, D, F, "swiglu")
    plan, _ = _explicit_plan(torch.tensor([[0, 1], [1, 3], [3, 0], [0, 3], [1, 0], [3, 1]]), E)
    x = torch.randn(T, D, requires_grad=True)
    args = (x, experts.w_in, experts.w_out, plan.weights.detach().requires_grad_(), plan.token_ids, plan.offsets, "swiglu", True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(tb.triton_experts, args, test_utils=utils)
    torch.library.opcheck(tb.triton_router_topk, (torch.randn(T, E, requires_grad=True), None, 2, 0, True, 1.0), test_utils=utils)


def test_layer_compiles_with_fullgraph_and_matches_eager():
    cfg = MoEConfig(dim=20, hidden_dim=16, num_experts=4, top_k=2, backend="triton", check_finite=False)
    torch.manual_seed(0)
    model = MoE(cfg)
    x, g = torch.randn(2, 5, 20), torch.randn(2, 5, 20)
    eager = _run(model, x, g)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_close(_run(compiled, x, g), eager, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_the_benchmark_times_the_triton_backend_end_to_end():
    """`sparsemoe bench` with the Triton contender (the code path of `--gpu`: reports, agreement check,
    memory), so a lent GPU's time is not spent on the harness's bugs."""
    from sparsemoe.bench.report import markdown
    from sparsemoe.bench.suite import SuiteOptions, run_suite

    opts = SuiteOptions(configs=("tiny",), tokens=(24,), dtypes=("float32",), routings=("random",),
                        impls=("sparsemoe triton", "sparsemoe grouped", "dense ideal"), repeats=1, recompute=False,
                        log=lambda line: None)  # fmt: skip
    result = run_suite(opts)
    for case in result["cases"]:
        assert not case["errors"], case["errors"]
        assert {"forward", "backward"} == set(case["timings"])
        assert "sparsemoe triton" in case["timings"]["backward"] and "sparsemoe triton" in case["memory"]
        assert case["agreement"]["oracle"] == "sparsemoe grouped"
        assert case["agreement"]["max_rel_error"]["sparsemoe triton"] < 1e-5
    assert "| sparsemoe triton |" in markdown(result, "sparsemoe bench --gpu")


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(score_func="sigmoid", bias_balancing=True, route_scale=2.0),
        dict(bias_balancing=True),  # softmax: the bias moves logits
        dict(score_order="after_topk", renormalize=False),
    ],
)
def test_layer_routes_through_the_fused_kernel_with_the_same_result(fields, monkeypatch):
    import sparsemoe.routing as routing

    cfg = MoEConfig(dim=12, hidden_dim=8, num_experts=6, top_k=2, backend="grouped", **fields)
    torch.manual_seed(0)
    fused_layer = MoE(cfg)
    with torch.no_grad():
        fused_layer.router.expert_bias.uniform_(-0.2, 0.2)
    x = torch.randn(9, 12)
    grad_out = torch.randn(9, 12)
    calls = []
    fused_fn, available = routing._fused_topk
    monkeypatch.setattr(routing, "_fused_topk", (lambda *a: calls.append(1) or fused_fn(*a), available))
    fused_layer.eval()
    got = _run(fused_layer, x, grad_out)
    assert calls, "the layer did not use the fused router"
    monkeypatch.setattr(routing, "_fused_topk", None)
    want = _run(fused_layer, x, grad_out)
    _assert_close(got, want)
