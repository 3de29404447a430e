"""The triton backend: scatter/gather expert GEMMs on the GPU, wrapped as custom ops with autograd.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated), E experts,
K experts per token, N plan rows (sorted by expert; dropped rows last, never computed).

    forward    a = act(x[tok] @ w_in[e]^T)            kernels.up_projection   (gather + fused SwiGLU)
               y[tok] += w[n] * (a @ w_out[e]^T)       kernels.scatter_projection (fp32 atomics)
    backward   dh, d weights                           kernels.down_backward   (gather dy, fused act')
               d w_out, d w_in                         kernels.weight_gradient (gathered rows)
               dx[tok] += dh @ w_in[e]                 kernels.scatter_projection

Three layers as everywhere in the package: `@triton.jit` kernel -> host launcher (sparsemoe.kernels)
-> `torch.library.custom_op` with a fake implementation and a registered backward (here), so
`torch.compile(fullgraph=True)` traces through. The dropless path never reads a device value on the
host (the kernels find their expert blocks from the offsets on the device), so it can be captured in a
CUDA graph once the autotuner has picked its configs (run one step before capturing).

Runs where the kernels can: CUDA tensors, or CPU tensors when the process started with
TRITON_INTERPRET=1 (the Triton interpreter; tests only). Also provides the fused router
(`fused_topk`), which the layer may call instead of softmax + topk + renormalise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsemoe.dispatch.grouped import grouped_forward
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.experts import Experts

try:
    from sparsemoe import kernels as _kernels

    IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # Triton present but unusable here (broken install, no compiler): stay unregistered
    _kernels = None
    IMPORT_ERROR = exc

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(x: Tensor) -> bool:
    """Whether the kernels can run on `x`: CUDA (compiled kernels) or CPU under TRITON_INTERPRET=1."""
    if _kernels is None or x.dtype not in _DTYPES:
        return False
    if _kernels.INTERPRET:
        return x.device.type == "cpu"
    return x.device.type == "cuda"


# --- expert MLP: one op for forward, one for backward ----------------------------------------------------


@torch.library.custom_op("sparsemoe::triton_experts", mutates_args=())
def triton_experts(
    x_TD: Tensor,
    w_in_EID: Tensor,
    w_out_EDF: Tensor,
    weights_N: Tensor,
    token_ids_N: Tensor,
    offsets_E: Tensor,
    activation: str,
    keep_hidden: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, D] float32, h [N, I], a [N, F]); h and a are kept for the backward only when `keep_hidden`
    (otherwise they are empty [0, ...] and the backward recomputes them)."""
    a_NF, h_NI = _kernels.up_projection(x_TD, w_in_EID, token_ids_N, offsets_E, activation, keep_hidden)
    y_TD = _kernels.scatter_projection(a_NF, w_out_EDF, True, token_ids_N, offsets_E, weights_N, x_TD.shape[0])
    return y_TD, h_NI, a_NF if keep_hidden else a_NF.new_empty(0, a_NF.shape[1])


@triton_experts.register_fake
def _triton_experts_fake(x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, activation, keep_hidden):
    kept = token_ids_N.shape[0] if keep_hidden else 0
    y_TD = x_TD.new_empty(x_TD.shape[0], w_out_EDF.shape[1], dtype=torch.float32)
    return y_TD, x_TD.new_empty(kept, w_in_EID.shape[1]), x_TD.new_empty(kept, w_out_EDF.shape[2])


@torch.library.custom_op("sparsemoe::triton_experts_backward", mutates_args=())
def triton_experts_backward(
    dy_TD: Tensor,
    x_TD: Tensor,
    w_in_EID: Tensor,
    w_out_EDF: Tensor,
    weights_N: Tensor,
    token_ids_N: Tensor,
    offsets_E: Tensor,
    h_NI: Tensor,
    a_NF: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, D], d w_in [E, I, D], d w_out [E, D, F], d weights [N] float32).

    Empty h / a (the forward kept nothing: `recompute_activations`) are recomputed here, one more GEMM.
    """
    N, T = token_ids_N.shape[0], x_TD.shape[0]
    dy_TD = dy_TD.contiguous()
    if h_NI.shape[0] != N or a_NF.shape[0] != N:
        a_NF, h_NI = _kernels.up_projection(x_TD, w_in_EID, token_ids_N, offsets_E, activation, True)
    dh_NI, dweights_N = _kernels.down_backward(dy_TD, w_out_EDF, token_ids_N, weights_N, offsets_E, h_NI, a_NF, activation)
    # d w_out[e] = sum_n (w[n] dy[tok n])^T a[n]: dy read in token order, scaled on the fly.
    dw_out = _kernels.weight_gradient(
        dy_TD, a_NF, offsets_E, N, g_index_N=token_ids_N, scale_N=weights_N, out_dtype=w_out_EDF.dtype
    )
    dx_TD = _kernels.scatter_projection(dh_NI, w_in_EID, False, token_ids_N, offsets_E, None, T).to(x_TD.dtype)
    dw_in = _kernels.weight_gradient(dh_NI, x_TD, offsets_E, N, x_index_N=token_ids_N, out_dtype=w_in_EID.dtype)
    return dx_TD, dw_in, dw_out, dweights_N


@triton_experts_backward.register_fake
def _triton_experts_backward_fake(dy_TD, x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, h_NI, a_NF, activation):
    return (
        torch.empty_like(x_TD),
        torch.empty_like(w_in_EID),
        torch.empty_like(w_out_EDF),
        weights_N.new_empty(weights_N.shape, dtype=torch.float32),
    )


def _experts_setup_context(ctx, inputs, output) -> None:
    x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, activation, _ = inputs
    _, h_NI, a_NF = output
    ctx.activation = activation
    ctx.save_for_backward(x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, h_NI, a_NF)


def _experts_backward(ctx, dy_TD, _dh, _da):
    x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, h_NI, a_NF = ctx.saved_tensors
    dx_TD, dw_in, dw_out, dweights_N = triton_experts_backward(
        dy_TD, x_TD, w_in_EID, w_out_EDF, weights_N, token_ids_N, offsets_E, h_NI, a_NF, ctx.activation
    )
    return dx_TD, dw_in, dw_out, dweights_N.to(weights_N.dtype), None, None, None, None


triton_experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)


def triton_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    """The backend function: y [T, D] float32 from the plan, with gradients to x, the expert weights
    and the plan's combine weights (and through them the router)."""
    if experts.dropout > 0 and experts.training:
        # Hidden-unit dropout is not fused into the kernels; the grouped path applies it exactly.
        return grouped_forward(x_TD, plan, experts)
    w_in, w_out, weights = experts.w_in, experts.w_out, plan.weights.float()
    # Saving h and a costs N * (I + F) elements; `recompute_activations` trades that for one more GEMM.
    keep_hidden = (
        torch.is_grad_enabled()
        and not experts.recompute_activations
        and (x_TD.requires_grad or w_in.requires_grad or w_out.requires_grad or weights.requires_grad)
    )
    y_TD, _, _ = triton_experts(
        x_TD.contiguous(),
        w_in,
        w_out,
        weights.contiguous(),
        plan.token_ids.contiguous(),
        plan.offsets.contiguous(),
        experts.activation,
        keep_hidden,
    )
    return y_TD


# --- fused router -------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsemoe::triton_router_topk", mutates_args=())
def triton_router_topk(
    logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, score_mode: int, renormalize: bool, route_scale: float
) -> tuple[Tensor, Tensor]:
    """(expert ids [T, K] long, weights [T, K] float32) from float32 logits [T, E], in one kernel."""
    return _kernels.router_topk(logits_TE, top_k, score_mode, renormalize, route_scale, bias_E)


@triton_router_topk.register_fake
def _triton_router_topk_fake(logits_TE, bias_E, top_k, score_mode, renormalize, route_scale):
    T = logits_TE.shape[0]
    return logits_TE.new_empty(T, top_k, dtype=torch.long), logits_TE.new_empty(T, top_k, dtype=torch.float32)


def router_weights_backward(
    logits_TE: Tensor, ids_TK: Tensor, dweights_TK: Tensor, score_mode: int, renormalize: bool, route_scale: float
) -> Tensor:
    """d logits [T, E] for weights = renorm(score(logits)[ids]) * scale; the selection has no gradient."""
    dc_TK = dweights_TK * route_scale
    if score_mode == 2:  # softmax over the K chosen logits
        w_TK = torch.softmax(logits_TE.gather(1, ids_TK), dim=-1)
        return torch.zeros_like(logits_TE).scatter(1, ids_TK, w_TK * (dc_TK - (w_TK * dc_TK).sum(-1, keepdim=True)))
    scores_TE = torch.softmax(logits_TE, dim=-1) if score_mode == 0 else torch.sigmoid(logits_TE)
    if renormalize:
        chosen_TK = scores_TE.gather(1, ids_TK)
        total = chosen_TK.sum(-1, keepdim=True)
        safe = total.clamp_min(1e-20)
        # d(c_k / S) / d c_j = delta_jk / S - c_k / S^2 (the clamp has no gradient where it binds).
        dc_TK = dc_TK / safe - (dc_TK * chosen_TK).sum(-1, keepdim=True) / safe**2 * (total > 1e-20)
    ds_TE = torch.zeros_like(logits_TE).scatter(1, ids_TK, dc_TK)
    if score_mode == 0:
        return scores_TE * (ds_TE - (scores_TE * ds_TE).sum(-1, keepdim=True))
    return ds_TE * scores_TE * (1 - scores_TE)


def _router_setup_context(ctx, inputs, output) -> None:
    logits_TE, _, _, score_mode, renormalize, route_scale = inputs
    ctx.score_mode, ctx.renormalize, ctx.route_scale = score_mode, renormalize, route_scale
    ctx.save_for_backward(logits_TE, output[0])


def _router_backward(ctx, _dids, dweights_TK):
    logits_TE, ids_TK = ctx.saved_tensors
    dlogits = router_weights_backward(logits_TE, ids_TK, dweights_TK, ctx.score_mode, ctx.renormalize, ctx.route_scale)
    return dlogits, None, None, None, None, None


triton_router_topk.register_autograd(_router_backward, setup_context=_router_setup_context)

_SCORE_MODES = {("softmax", "before_topk"): 0, ("sigmoid", "before_topk"): 1, ("softmax", "after_topk"): 2}


def _topk_torch(logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, mode: int, renormalize: bool, scale: float):
    """The same routing in plain PyTorch (where the kernel cannot run); autograd gives the backward."""
    scores = logits_TE if mode == 2 else (torch.softmax(logits_TE, -1) if mode == 0 else torch.sigmoid(logits_TE))
    key = scores if bias_E is None else (scores if mode == 1 else logits_TE) + bias_E  # as sparsemoe.routing
    ids_TK = key.topk(top_k, dim=-1).indices
    chosen = scores.gather(1, ids_TK)
    if mode == 2:
        weights = torch.softmax(chosen, dim=-1)
    elif renormalize:
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
    else:
        weights = chosen
    return ids_TK, weights * scale


def fused_topk(
    logits_TE: Tensor,
    top_k: int,
    score_func: str = "softmax",
    score_order: str = "before_topk",
    renormalize: bool = True,
    route_scale: float = 1.0,
    bias_E: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Token-choice top-k routing of float32 logits [T, E] -> (ids [T, K] long, weights [T, K] float32).

    The same result as `sparsemoe.routing.token_choice` for router="topk" without noise: scores
    (softmax over E, or sigmoid), selection by score + `bias_E` (added to sigmoid scores, or to softmax
    logits; never to the weights), weights renormalised to sum 1 (or a softmax over the K chosen logits with score_order="after_topk"),
    times `route_scale`. One Triton kernel where `available(logits)`, the same math in PyTorch otherwise.
    """
    mode = _SCORE_MODES.get((score_func, score_order))
    if mode is None:
        raise ValueError(
            f"fused_topk: score_func={score_func!r} with score_order={score_order!r} is not supported; accepted: "
            "softmax/before_topk, sigmoid/before_topk, softmax/after_topk"
        )
    if logits_TE.dim() != 2:
        raise ValueError(f"fused_topk expects logits of shape [T, E], got {tuple(logits_TE.shape)}")
    E = logits_TE.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"fused_topk: top_k={top_k} is invalid: expected an integer from 1 to E={E}")
    if bias_E is not None and tuple(bias_E.shape) != (E,):
        raise ValueError(f"fused_topk: bias_E must have shape [{E}], got {tuple(bias_E.shape)}")
    logits_TE = logits_TE.float()
    bias_E = bias_E.float().contiguous() if bias_E is not None else None
    if available(logits_TE):
        return triton_router_topk(logits_TE.contiguous(), bias_E, top_k, mode, renormalize, float(route_scale))
    return _topk_torch(logits_TE, bias_E, top_k, mode, renormalize, float(route_scale))


if _kernels is not None:
    from sparsemoe.dispatch import register_backend
    from sparsemoe.routing import register_fused_topk

    register_backend("triton", triton_forward, available)
    register_fused_topk(fused_topk, available)
