"""A decode step's transformer blocks as direct native calls (CPU inference, one new position per sequence).

Legend: B sequences, D model width, H query heads, G key/value heads, Hd head width, E experts, K experts
per token.

At a decode step a block is a dozen small native calls (RMSNorm, q/k/v, one-position attention, the output
projection, the router's top-k, the expert stage; `sparsemoe.ops`). Made through the modules and the
kernels' Python wrappers, each call costs more than its arithmetic (argument checks, module dispatch, fresh
output tensors): greedy decode of mixtral-1k in bfloat16 took 12.7-13.1 ms per token through the modules
and 10.6-10.9 ms with its blocks as the same calls made directly into buffers kept from step to step, the
demo model 1.02-1.09 against 0.47-0.50, the same tokens (2 threads; `python tools/native_decode_gain.py`,
`docs/benchmarks.md`). `NativeDecode` prepares those calls once per model, cache and batch size
and replays them; `native_decode(model, cache, x)` returns it where every block qualifies, else None (the
blocks then run as modules):

* plain pre-norm blocks (no post- or sandwich norms, residual multiplier 1), no forward hooks anywhere;
* grouped-query attention (`Attention`, not MLA) without q/k norms, gates or biases (its projections on the
  native kernel, or on F.linear below the size where `sparsemoe.ops.linear` takes the kernel, as there);
* MoE layers with token-choice top-k routing and no selection bias, plain or quantized experts (int8, int4),
  no shared experts, no capacity at inference, whose expert stage runs on the decode kernel at this batch
  size; or a dense MLP (run as its module);
* float32 or bfloat16 weights of one dtype, the native kernels built, no autocast, no gradients.

Each step computes what the modules compute, call for call: the same kernels on the same values in the
same order, so the results are identical (tests). Where a check fails (non-finite router logits or MoE
output) the block is run again as modules, which raise their error; writing the same key and value into
the cache twice changes nothing. The MoE layers' balancing losses and statistics stay readable (computed
when read, as after a module forward).
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as nn_module

from sparsemoe.amp import autocast_dtype
from sparsemoe.dispatch import from_choices_applies
from sparsemoe.experts import Experts
from sparsemoe.layer import MoE
from sparsemoe.model.attention import Attention, KVCache, RMSNorm
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops.linear import linear_float32, native_applies
from sparsemoe.quant.experts import QuantizedExperts
from sparsemoe.routing import RoutingResult, assignment_tokens

_VOID_P, _INT64 = ctypes.c_void_p, ctypes.c_int64


def _pointers(tensors) -> ctypes.Array:
    return (_VOID_P * len(tensors))(*[t.data_ptr() for t in tensors])


def _plain_block(block: Any) -> bool:
    return (
        not block.post_norm
        and block.attn_post_norm is None
        and block.ffn_post_norm is None
        and block.residual_multiplier == 1.0
        and type(block.attn) is Attention
        and type(block.attn_norm) is RMSNorm
        and type(block.ffn_norm) is RMSNorm
    )


def _plain_attention(attn: Attention, dtype: torch.dtype) -> bool:
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    return (
        attn.q_norm is None
        and attn.gate_proj is None
        and all(p.bias is None and p.weight.dtype == dtype and p.weight.is_contiguous() for p in projections)
    )


def _decoding_moe(layer: MoE, h_BD: Tensor) -> bool:
    """Whether the MoE layer's module forward would take the native path at this batch: top-k routing on the
    native kernel, the expert stage from the router's choices (`sparsemoe.dispatch.from_choices_applies`:
    float experts on the decode kernel, quantized ones on theirs)."""
    cfg = layer.config
    B, experts = h_BD.shape[0], layer.experts
    return (
        type(layer) is MoE
        and type(experts) in (Experts, QuantizedExperts)
        and layer.shared_experts is None
        and cfg.router == "topk"
        and cfg.score_order == "before_topk"
        and not cfg.bias_balancing
        and cfg.capacity(B, False) is None
        and from_choices_applies(cfg.backend, h_BD, B * cfg.top_k, cfg.num_experts, None, experts)
    )


def _watch_list(block: Any, cache: KVCache, index: int) -> list[tuple[Any, Any, Any, int]]:
    """What one block's prepared calls depend on, as (container, key, object, address): every module on the way
    to a tensor they read or write, and the tensor with its data address (0 for a module). Checked before
    each step by identity and address, straight on the containers (a module attribute lookup costs ~1 us)."""
    attn, ffn = block._modules["attn"], block._modules["ffn"]
    watched: list[tuple[Any, Any, Any, int]] = [(block._modules, name, block._modules[name], 0)
                                               for name in ("attn", "attn_norm", "ffn_norm", "ffn")]  # fmt: skip
    for module in (attn._modules["q_proj"], attn._modules["k_proj"], attn._modules["v_proj"], attn._modules["o_proj"],
                   block._modules["attn_norm"], block._modules["ffn_norm"]):  # fmt: skip
        weight = module._parameters["weight"]
        watched.append((module._parameters, "weight", weight, weight.data_ptr()))
    watched += [(attn._modules, name, attn._modules[name], 0) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for tensors in (cache.keys, cache.values):
        watched.append((tensors, index, tensors[index], tensors[index].data_ptr()))
    if isinstance(ffn, MoE):
        experts, router = ffn._modules["experts"], ffn._modules["router"]
        watched += [(ffn._modules, "experts", experts, 0), (ffn._modules, "router", router, 0),
                    (ffn.__dict__, "config", ffn.config, 0)]  # a new config (backend, routing) prepares again
        if isinstance(experts, QuantizedExperts):
            stored = [experts._modules[name]._buffers for name in ("w_in", "w_out")]
            tensors = [(buffers, name) for buffers in stored for name in ("data", "scale")]
        else:
            tensors = [(experts._parameters, "w_in"), (experts._parameters, "w_out")]
        for container, name in (*tensors, (router._parameters, "weight")):
            watched.append((container, name, container[name], container[name].data_ptr()))
    return watched


def _unchanged(watched: list[tuple[Any, Any, Any, int]]) -> bool:
    return all(c[k] is obj and (not address or obj.data_ptr() == address) for c, k, obj, address in watched)


class _Layer:
    """One block's prepared calls: the tensors they read (kept, to notice one replaced or moved) and the
    ctypes arguments that do not change from step to step."""

    def __init__(self, index: int, block: Any, cache: KVCache, buffers: dict[str, Tensor]) -> None:
        attn = block.attn
        self.block, self.index = block, index
        self.window = attn.window or 0
        self.rope = attn.rope
        self.scale = attn.scale if attn.scale is not None else attn.head_dim**-0.5
        self.attn_norm, self.ffn_norm = block.attn_norm, block.ffn_norm
        qkv = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        self.qkv = (_pointers(qkv), (_INT64 * 3)(*[w.shape[0] for w in qkv]),
                    _pointers((buffers["q"], buffers["k"], buffers["v"])))  # fmt: skip
        self.o_proj = (_pointers((attn.o_proj.weight,)), (_INT64 * 1)(attn.o_proj.weight.shape[0]),
                       _pointers((buffers["o"],)))  # fmt: skip
        # projections below the native kernel's size run as the modules run them: F.linear
        B = buffers["h"].shape[0]
        self.qkv_native = native_applies(buffers["h"].view(B, 1, -1), qkv)
        self.o_native = native_applies(buffers["att"].view(B, 1, -1), (attn.o_proj.weight,))
        self.qkv_weights, self.o_weight = qkv, attn.o_proj.weight
        self.cache_k, self.cache_v = cache.keys[index], cache.values[index]
        self.moe = block.ffn if isinstance(block.ffn, MoE) else None
        self.watched = _watch_list(block, cache, index)
        # what the calls take, read once (current() checks that the addresses still hold)
        self.norms = (self.attn_norm.weight.data_ptr(), self.attn_norm.eps, self.ffn_norm.weight.data_ptr(),
                      self.ffn_norm.eps)  # fmt: skip
        self.cache_args = (self.cache_k.data_ptr(), self.cache_v.data_ptr(), self.cache_k.shape[2])
        if self.moe is not None:
            cfg, experts = self.moe.config, self.moe.experts
            self.router_weight = self.moe.router.weight
            self.routing_args = (cfg.num_experts, cfg.top_k, int(cfg.score_func == "sigmoid"), int(cfg.renormalize),
                                 cfg.route_scale)  # fmt: skip
            act = cpu_kernels.ACTIVATION_CODES[experts.activation]
            if isinstance(experts, QuantizedExperts):  # stored bytes and scales, bits, group, F, I
                w_in, w_out = experts.w_in, experts.w_out
                self.quantized_args = (w_in.data.data_ptr(), w_in.scale.data_ptr(), w_out.data.data_ptr(),
                                       w_out.scale.data_ptr(), cpu_kernels.QUANT_BITS[experts.scheme.name],
                                       experts.scheme.group_size or 0, experts.hidden_dim, w_in.data.shape[1],
                                       act)  # fmt: skip
            else:
                self.quantized_args = None
                self.expert_args = (experts.w_in.data_ptr(), experts.w_out.data_ptr(), experts.w_out.shape[2],
                                    experts.w_in.shape[1], act)  # fmt: skip


class NativeDecode:
    """The blocks of one model at a decode step of B sequences, as prepared native calls (module docstring)."""

    def __init__(self, model: Any, cache: KVCache, batch: int) -> None:
        config = model.config
        self.dtype = model.layers[0].attn.q_proj.weight.dtype
        self.B, self.D = batch, config.dim
        self.H, self.G, self.Hd = config.n_heads, config.n_kv_heads, config.head_dim
        suffix = cpu_kernels.KERNEL_DTYPES[self.dtype]
        lib = cpu_kernels.load()
        self.lib = lib
        self.rms_norm = getattr(lib, f"sparsemoe_rms_norm_{suffix}")
        self.linear_many = getattr(lib, f"sparsemoe_linear_many_{suffix}")
        self.attention = getattr(lib, f"sparsemoe_decode_attention_{suffix}")
        self.experts = getattr(lib, f"sparsemoe_decode_mlp_choices_{suffix}")
        self.quantized_experts = lib.sparsemoe_decode_mlp_quant_choices
        self.half = int(self.dtype == torch.bfloat16)
        B, D, H, G, Hd = self.B, self.D, self.H, self.G, self.Hd
        empty = lambda *shape: torch.empty(*shape, dtype=self.dtype)  # noqa: E731
        self.buffers = {"h": empty(B, D), "q": empty(B, H * Hd), "k": empty(B, G * Hd), "v": empty(B, G * Hd),
                        "att": empty(B, H * Hd), "o": empty(B, D), "y": torch.empty(B, D),
                        "y_out": empty(B, D)}  # fmt: skip
        self.cache = cache
        self.layers = [_Layer(i, block, cache, self.buffers) for i, block in enumerate(model.layers)]
        self.modules = list(model.layers.modules())

    def current(self, model: Any, cache: KVCache) -> bool:
        """Prepared for this model and cache as they are now: the same modules, tensors and addresses."""
        blocks = model._modules["layers"]._modules
        return (
            cache is self.cache
            and len(blocks) == len(self.layers)
            and all(blocks[str(i)] is layer.block and _unchanged(layer.watched) for i, layer in enumerate(self.layers))
        )

    def hooked(self) -> bool:
        """Whether a module of the blocks has a forward hook (the blocks must then run as modules)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def run(self, x_BSD: Tensor, past: int, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        """x [B, 1, D] after every block, the new position's keys and values written into the cache at `past`
        (the cache's length); cos_SR, sin_SR: the float32 RoPE table rows [1, R] of that position."""
        B, D = self.B, self.D
        threads = torch.get_num_threads()
        buf = self.buffers
        h, att, o, y = buf["h"], buf["att"], buf["o"], buf["y"]
        h_ptr, att_ptr = h.data_ptr(), att.data_ptr()
        q_ptr, k_ptr, v_ptr = buf["q"].data_ptr(), buf["k"].data_ptr(), buf["v"].data_ptr()
        rope = (cos_SR.data_ptr(), sin_SR.data_ptr(), cos_SR.shape[-1])
        no_rope = (None, None, self.Hd)
        tokens = None  # the assignments' token ids [B*K], shared by the MoE layers' routing results
        check = cpu_kernels.check_status
        x_BD = x_BSD.reshape(B, D)  # the residual stream; a block's input is kept until the block is done
        for layer in self.layers:
            attn_norm, attn_eps, ffn_norm, ffn_eps = layer.norms
            self.rms_norm(x_BD.data_ptr(), attn_norm, B, D, attn_eps, h_ptr, threads)
            if layer.qkv_native:
                check(self.linear_many(h_ptr, self.half, B, D, 3, *layer.qkv, self.half, threads), "linear_many")
                qkv = (q_ptr, k_ptr, v_ptr)
            else:
                q, k, v = (F.linear(h.view(B, 1, D), w) for w in layer.qkv_weights)
                qkv = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            cos, sin, R = rope if layer.rope else no_rope
            check(self.attention(*qkv, cos, sin, *layer.cache_args[:2], B, self.H, self.G, self.Hd, R,
                                 layer.cache_args[2], past, layer.window, layer.scale, att_ptr, threads),
                  "decode_attention")  # fmt: skip
            if layer.o_native:
                check(self.linear_many(att_ptr, self.half, B, self.H * self.Hd, 1, *layer.o_proj, self.half, threads),
                      "linear_many")  # fmt: skip
                x_mid = x_BD + o
            else:
                x_mid = x_BD + F.linear(att.view(B, 1, self.H * self.Hd), layer.o_weight).view(B, D)
            self.rms_norm(x_mid.data_ptr(), ffn_norm, B, D, ffn_eps, h_ptr, threads)
            if layer.moe is None:
                y_BD = layer.block.ffn(h.view(B, 1, D)).view(B, D)
            else:
                if tokens is None:
                    tokens = assignment_tokens(B, layer.routing_args[1], h.device)
                y_BD = self._moe(layer, h, y, tokens, threads)
                if y_BD is None:  # not finite: the modules, from this block's input, raise the error
                    return self._modules_from(layer.index, x_BD.view(B, 1, D), cos_SR, sin_SR)
            x_BD = x_mid.add_(y_BD)  # x + y in place: the same rounding
        return x_BD.view(B, 1, D)

    def _moe(self, layer: _Layer, h_BD: Tensor, y_BD: Tensor, tokens: Tensor, threads: int) -> Optional[Tensor]:
        """The MoE layer's output [B, D] in the model dtype as its module computes it, or None where its
        router logits or output are not finite. Leaves the layer's routing for its losses and statistics."""
        B = h_BD.shape[0]
        E, K, sigmoid, renormalize, route_scale = layer.routing_args
        logits = linear_float32(h_BD, layer.router_weight)
        if not self.lib.sparsemoe_all_finite(logits.data_ptr(), logits.numel(), 0, threads):
            return None
        probs, ids, weights = torch.empty(B, E), torch.empty(B, K, dtype=torch.int64), torch.empty(B, K)
        self.lib.sparsemoe_topk_route(logits.data_ptr(), B, E, K, sigmoid, renormalize, route_scale, probs.data_ptr(),
                                      ids.data_ptr(), weights.data_ptr())  # fmt: skip
        if layer.quantized_args is None:
            w_in, w_out, F, I, act = layer.expert_args
            status = self.experts(h_BD.data_ptr(), ids.data_ptr(), weights.data_ptr(), B, K, E, w_in, w_out, self.D, F,
                                  I, act, y_BD.data_ptr(), threads)  # fmt: skip
        else:
            in_data, in_scale, out_data, out_scale, bits, group, F, I, act = layer.quantized_args
            status = self.quantized_experts(h_BD.data_ptr(), self.half, ids.data_ptr(), weights.data_ptr(), B, K, E,
                                            in_data, in_scale, out_data, out_scale, bits, group, self.D, F, I, act,
                                            y_BD.data_ptr(), threads)  # fmt: skip
        kernel = "decode_mlp_choices" if layer.quantized_args is None else "decode_mlp_quantized_choices"
        cpu_kernels.check_status(status, kernel)
        out = self.buffers["y_out"].copy_(y_BD) if self.half else y_BD
        if not self.lib.sparsemoe_all_finite(out.data_ptr(), out.numel(), self.half, threads):
            return None
        routing = RoutingResult(token_ids=tokens, expert_ids=ids.view(-1), weights=weights.view(-1), probs=probs,
                                logits=logits, top_k=K, expert_choice=False)  # fmt: skip
        layer.moe._aux_loss, layer.moe._stats_state = None, (routing, None, 1)
        return out

    def _modules_from(self, index: int, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        """The blocks from `index` on as modules (a check failed there): they raise the error it stands for."""
        for layer in self.layers[index:]:
            x_BSD = layer.block(x_BSD, cos_SR, sin_SR, self.cache)
        return x_BSD


_UNPREPARED = object()


def native_decode(model: Any, cache: KVCache, x_BSD: Tensor) -> Optional[NativeDecode]:
    """The prepared native decode step for this model, cache and batch (kept on the cache between steps, and
    prepared again when a weight was replaced or moved), or None where it does not apply (module docstring)."""
    if not _runtime_ok(model, x_BSD):
        return None
    prepared = cache.__dict__.setdefault("_native_decode", {})
    B = x_BSD.shape[0]
    runner = prepared.get(B, _UNPREPARED)
    if runner is _UNPREPARED or (runner is not None and not runner.current(model, cache)):
        runner = prepared[B] = _prepare(model, cache, x_BSD)
    return None if runner is None or runner.hooked() else runner


def _runtime_ok(model: Any, x_BSD: Tensor) -> bool:
    """What may change from call to call: gradients, autocast, global hooks, the input (the blocks' own hooks:
    NativeDecode.current)."""
    return (
        not model.training
        and not torch.is_grad_enabled()
        and cpu_kernels.plain_eager(x_BSD)
        and x_BSD.dim() == 3
        and x_BSD.shape[1] == 1
        and autocast_dtype("cpu") is None
        and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
    )


def _prepare(model: Any, cache: KVCache, x_BSD: Tensor) -> Optional[NativeDecode]:
    config = model.config
    dtype = x_BSD.dtype
    B = x_BSD.shape[0]
    if (config.attention == "mla" or dtype not in cpu_kernels.KERNEL_DTYPES or not cpu_kernels.available()
            or any(k.dtype != dtype or not k.is_contiguous() for k in (*cache.keys, *cache.values))):
        return None  # fmt: skip
    h = torch.empty(B, 1, config.dim, dtype=dtype)
    for block in model.layers:
        if not _plain_block(block) or not _plain_attention(block.attn, dtype):
            return None
        if any(n.weight.dtype != dtype or not n.weight.is_contiguous() for n in (block.attn_norm, block.ffn_norm)):
            return None
        if isinstance(block.ffn, MoE) and not _decoding_moe(block.ffn, h.view(B, -1)):
            return None
    return NativeDecode(model, cache, B)
