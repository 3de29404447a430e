"""A decode step's transformer blocks as direct native calls (CPU inference, one new position per sequence).

Legend: B sequences, D model width, H query heads, G key/value heads, Hd head width, E experts, K experts
per token.

At a decode step a block is a dozen small native calls (RMSNorm, q/k/v, one-position attention, the output
projection, the router's product and top-k, the expert stage; `sparsemoe.ops`). Made through the modules and
the kernels' Python wrappers, each call costs more than its arithmetic (argument checks, module dispatch,
fresh output tensors), and a step starts with its caches emptied by the last step's weight stream, where
every Python object touched is a trip to memory. `NativeDecode` prepares a block's calls once per model,
cache and batch size and makes each block two native calls (csrc/decode_block.c: the attention half, from
the residual stream to the feed-forward's normalised input, and the MoE half, from there to the block's
output), then the final norm and the LM head; blocks whose projections run on F.linear (float32 weights
below the size where `sparsemoe.ops.linear` takes the kernel) make their attention half's calls from
Python. Measured: `python tools/native_decode_gain.py` and `tools/native_decode_profile.py`
(`docs/benchmarks.md`). `native_decode(model, cache, x)` returns it where every block qualifies, else None
(the blocks then run as modules):

* plain pre-norm blocks (no post- or sandwich norms, residual multiplier 1), no forward hooks anywhere (the
  final norm and LM head run from the step where they are an `RMSNorm` and a `Linear` without bias, or the
  tied embedding; else as modules);
* grouped-query attention (`Attention`, not MLA) without q/k norms, gates or biases (its projections on the
  native kernel, or on F.linear below the size where `sparsemoe.ops.linear` takes the kernel, as there);
* MoE layers with token-choice top-k routing and no selection bias, plain or quantized experts (int8, int4),
  no shared experts, no capacity at inference, whose expert stage runs on the decode kernel and router
  product on the native kernel at this batch size (`sparsemoe.ops.linear.MAX_ROWS`); or a dense MLP (run
  as its module);
* float32 or bfloat16 weights of one dtype, the native kernels built, no autocast, no gradients.

Each step computes what the modules compute, call for call: the same kernels on the same values in the
same order, so the results are identical (tests). Where a check fails (non-finite router logits or MoE
output) the block is run again as modules, which raise their error; writing the same key and value into
the cache twice changes nothing. The MoE layers' balancing losses and statistics stay readable (computed
when read, as after a module forward, from routing buffers the next step overwrites).
"""

from __future__ import annotations

import ctypes
import operator
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
from sparsemoe.ops.linear import Linear, native_applies
from sparsemoe.quant.experts import QuantizedExperts
from sparsemoe.routing import RoutingResult, assignment_tokens

_VOID_P, _INT64 = ctypes.c_void_p, ctypes.c_int64


def _pointers(tensors) -> ctypes.Array:
    return (_VOID_P * len(tensors))(*[t.data_ptr() for t in tensors])


class _BlockArgs(ctypes.Structure):
    """What one block's native halves read (`decode_block_t` of csrc/decode_block.c: keep the two in step)."""

    _fields_ = [
        ("attn_norm", _VOID_P), ("attn_eps", ctypes.c_float), ("qkv", _VOID_P * 3), ("qkv_rows", _INT64 * 3),
        ("o_proj", _VOID_P), ("o_rows", _INT64), ("cache_k", _VOID_P), ("cache_v", _VOID_P), ("cache_len", _INT64),
        ("window", _INT64), ("scale", ctypes.c_float), ("rope", ctypes.c_int), ("ffn_norm", _VOID_P),
        ("ffn_eps", ctypes.c_float), ("router", _VOID_P), ("E", _INT64), ("K", _INT64), ("sigmoid", ctypes.c_int),
        ("renormalize", ctypes.c_int), ("route_scale", ctypes.c_float), ("bits", ctypes.c_int), ("w_in", _VOID_P),
        ("s_in", _VOID_P), ("w_out", _VOID_P), ("s_out", _VOID_P), ("group", _INT64), ("F", _INT64), ("I", _INT64),
        ("act", ctypes.c_int), ("logits", _VOID_P), ("probs", _VOID_P), ("ids", _VOID_P), ("weights", _VOID_P),
    ]  # fmt: skip


class _StepArgs(ctypes.Structure):
    """The buffers the blocks share (`decode_step_t` of csrc/decode_block.c)."""

    _fields_ = [
        ("B", _INT64), ("D", _INT64), ("H", _INT64), ("G", _INT64), ("Hd", _INT64), ("h", _VOID_P), ("q", _VOID_P),
        ("k", _VOID_P), ("v", _VOID_P), ("att", _VOID_P), ("o", _VOID_P), ("y", _VOID_P), ("y_out", _VOID_P),
        ("threads", ctypes.c_int),
    ]  # fmt: skip


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
        and native_applies(h_BD, (layer.router.weight,), min_weights=0)  # the router's product (linear_float32)
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


class _Watched:
    """Watch-list entries (container, key, object, address), checked in C-level loops: a step begins with the
    caches emptied by the last step's weight stream, where a Python loop over the entries took 0.1-0.2 ms."""

    def __init__(self, entries: list[tuple[Any, Any, Any, int]]) -> None:
        self.containers, self.keys, self.objects, _ = map(list, zip(*entries))
        self.tensors = [obj for _, _, obj, address in entries if address]
        self.addresses = [address for _, _, _, address in entries if address]

    def unchanged(self) -> bool:
        try:
            same = all(map(operator.is_, map(operator.getitem, self.containers, self.keys), self.objects))
        except (KeyError, IndexError):  # an entry removed (e.g. a None attribute replaced by a module)
            return False
        return same and list(map(Tensor.data_ptr, self.tensors)) == self.addresses


class _Layer:
    """One block's prepared calls: their arguments (`_BlockArgs`; the tensors behind them are kept and watched
    by `NativeDecode`) and, for an MoE block, its routing buffers, overwritten at every step."""

    def __init__(self, index: int, block: Any, cache: KVCache, buffers: dict[str, Tensor]) -> None:
        attn = block.attn
        self.block, self.index = block, index
        attn_norm, ffn_norm = block.attn_norm, block.ffn_norm
        qkv = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        # projections below the native kernel's size run as the modules run them: F.linear, from Python
        B = buffers["h"].shape[0]
        self.qkv_native = native_applies(buffers["h"].view(B, 1, -1), qkv)
        self.o_native = native_applies(buffers["att"].view(B, 1, -1), (attn.o_proj.weight,))
        self.qkv_weights, self.o_weight = qkv, attn.o_proj.weight
        self.o_proj = (_pointers((attn.o_proj.weight,)), (_INT64 * 1)(attn.o_proj.weight.shape[0]))
        cache_k, cache_v = cache.keys[index], cache.values[index]
        self.moe = block.ffn if isinstance(block.ffn, MoE) else None
        args = self.args = _BlockArgs()
        args.attn_norm, args.attn_eps = attn_norm.weight.data_ptr(), attn_norm.eps
        args.ffn_norm, args.ffn_eps = ffn_norm.weight.data_ptr(), ffn_norm.eps
        args.qkv[:] = [w.data_ptr() for w in qkv]
        args.qkv_rows[:] = [w.shape[0] for w in qkv]
        args.o_proj, args.o_rows = attn.o_proj.weight.data_ptr(), attn.o_proj.weight.shape[0]
        args.cache_k, args.cache_v = cache_k.data_ptr(), cache_v.data_ptr()
        args.cache_len, args.window = cache_k.shape[2], attn.window or 0
        args.scale = attn.scale if attn.scale is not None else attn.head_dim**-0.5
        args.rope = int(attn.rope)
        if self.moe is not None:
            self._prepare_moe(args, B)
        self.ref = ctypes.byref(args)

    def _prepare_moe(self, args: _BlockArgs, B: int) -> None:
        cfg, experts = self.moe.config, self.moe.experts
        E, K = cfg.num_experts, cfg.top_k
        args.router, args.E, args.K = self.moe.router.weight.data_ptr(), E, K
        args.sigmoid, args.renormalize = int(cfg.score_func == "sigmoid"), int(cfg.renormalize)
        args.route_scale = cfg.route_scale
        args.act = cpu_kernels.ACTIVATION_CODES[experts.activation]
        args.F = experts.hidden_dim
        if isinstance(experts, QuantizedExperts):  # stored bytes and scales
            w_in, w_out = experts.w_in, experts.w_out
            args.w_in, args.s_in = w_in.data.data_ptr(), w_in.scale.data_ptr()
            args.w_out, args.s_out = w_out.data.data_ptr(), w_out.scale.data_ptr()
            args.bits, args.group = cpu_kernels.QUANT_BITS[experts.scheme.name], experts.scheme.group_size or 0
            args.I = w_in.data.shape[1]
        else:
            args.w_in, args.w_out, args.bits, args.I = experts.w_in.data_ptr(), experts.w_out.data_ptr(), 0, experts.w_in.shape[1]
        # the routing of the last step, as the module leaves it for the layer's losses and statistics (which
        # are computed from it when read, into tensors of their own)
        logits, probs = torch.empty(B, E), torch.empty(B, E)
        ids, weights = torch.empty(B, K, dtype=torch.int64), torch.empty(B, K)
        args.logits, args.probs = logits.data_ptr(), probs.data_ptr()
        args.ids, args.weights = ids.data_ptr(), weights.data_ptr()
        routing = RoutingResult(token_ids=assignment_tokens(B, K, logits.device), expert_ids=ids.view(-1),
                                weights=weights.view(-1), probs=probs, logits=logits, top_k=K, expert_choice=False)  # fmt: skip
        self.moe_state, self.moe_dict = (routing, None, 1), self.moe.__dict__


class NativeDecode:
    """The blocks of one model at a decode step of B sequences, as prepared native calls (module docstring)."""

    def __init__(self, model: Any, cache: KVCache, batch: int) -> None:
        config = model.config
        self.dtype = model.layers[0].attn.q_proj.weight.dtype
        self.B, self.D = batch, config.dim
        self.H, self.G, self.Hd = config.n_heads, config.n_kv_heads, config.head_dim
        suffix = cpu_kernels.KERNEL_DTYPES[self.dtype]
        lib = cpu_kernels.load()
        self.rms_norm = getattr(lib, f"sparsemoe_rms_norm_{suffix}")
        self.linear_many = getattr(lib, f"sparsemoe_linear_many_{suffix}")
        self.attention = getattr(lib, f"sparsemoe_decode_attention_{suffix}")
        self.attention_half = getattr(lib, f"sparsemoe_decode_attention_half_{suffix}")
        self.moe_half = getattr(lib, f"sparsemoe_decode_moe_half_{suffix}")
        self.half = int(self.dtype == torch.bfloat16)
        B, D, H, G, Hd = self.B, self.D, self.H, self.G, self.Hd
        empty = lambda *shape: torch.empty(*shape, dtype=self.dtype)  # noqa: E731
        self.buffers = {"h": empty(B, D), "q": empty(B, H * Hd), "k": empty(B, G * Hd), "v": empty(B, G * Hd),
                        "att": empty(B, H * Hd), "o": empty(B, D), "y": torch.empty(B, D),
                        "y_out": empty(B, D)}  # fmt: skip
        self.residual = (empty(B, D), empty(B, D))  # the blocks' outputs, in turn: a block's input stays intact
        step = self.step = _StepArgs(B, D, H, G, Hd)
        for name in ("h", "q", "k", "v", "att", "o", "y", "y_out"):
            setattr(step, name, self.buffers[name].data_ptr())
        self.step_ref = ctypes.byref(step)
        # the attention projections' call arguments, for blocks whose attention half runs from Python
        self.qkv_out = _pointers((self.buffers["q"], self.buffers["k"], self.buffers["v"]))
        self.o_out = _pointers((self.buffers["o"],))
        self.cache = cache
        self.layers = [_Layer(i, block, cache, self.buffers) for i, block in enumerate(model.layers)]
        blocks = model.layers._modules
        watched = [entry for i, block in enumerate(model.layers)
                   for entry in [(blocks, str(i), block, 0), *_watch_list(block, cache, i)]]  # fmt: skip
        hooked = list(model.layers.modules())
        self.head_args = self._prepare_head(model, watched, hooked)
        self.watched = _Watched(watched)
        # the replaced modules' hook dicts (registering a hook adds to its module's dict)
        self.hook_dicts = [d for m in hooked for d in (m._forward_hooks, m._forward_pre_hooks)]

    def _prepare_head(self, model: Any, watched: list, hooked: list) -> Optional[tuple]:
        """The final norm and LM head's call arguments, or None where they run as modules (another norm or head
        type, a bias, another dtype); adds what they read to `watched` and their modules to `hooked`."""
        norm, head = model._modules["norm"], model.lm_head
        head_owner = model.__dict__ if head is None else model._modules  # where nn.Module keeps None and modules
        weight = model.embed.weight if head is None else head.weight
        if not (type(norm) is RMSNorm and norm.weight.dtype == self.dtype and norm.weight.is_contiguous()
                and (head is None or (type(head) is Linear and head.bias is None))
                and weight.dtype == self.dtype and weight.is_contiguous()):
            return None  # fmt: skip
        owner = model._modules["embed"] if head is None else head
        watched += [(model._modules, "norm", norm, 0), (norm._parameters, "weight", norm.weight, norm.weight.data_ptr()),
                    (head_owner, "lm_head", head, 0), (model._modules, "embed", model._modules["embed"], 0),
                    (owner._parameters, "weight", weight, weight.data_ptr())]  # fmt: skip
        hooked += [norm] if head is None else [norm, head]
        native = native_applies(self.buffers["h"].view(self.B, 1, -1), (weight,))  # else F.linear, as `linear`
        return norm.weight.data_ptr(), norm.eps, weight, _pointers((weight,)), (_INT64 * 1)(weight.shape[0]), native

    def head(self, x_BSD: Tensor) -> Optional[Tensor]:
        """The logits [B, 1, V] of the blocks' output x [B, 1, D]: the final norm and the LM head as their modules
        compute them, or None where they must run as modules (`_prepare_head`)."""
        if self.head_args is None or not x_BSD.is_contiguous():
            return None
        norm_weight, eps, weight, weights, rows, native = self.head_args
        B, D = self.B, self.D
        h = self.buffers["h"]
        self.rms_norm(x_BSD.data_ptr(), norm_weight, B, D, eps, h.data_ptr(), self.step.threads)
        if not native:
            return F.linear(h.view(B, 1, D), weight)
        logits = torch.empty(B, 1, weight.shape[0], dtype=self.dtype)
        status = self.linear_many(h.data_ptr(), self.half, B, D, 1, weights, rows, _pointers((logits,)), self.half,
                                  self.step.threads)  # fmt: skip
        cpu_kernels.check_status(status, "linear_many")
        return logits

    def current(self, model: Any, cache: KVCache) -> bool:
        """Prepared for this model and cache as they are now: the same modules, tensors and addresses."""
        return (
            cache is self.cache
            and len(model._modules["layers"]._modules) == len(self.layers)
            and self.watched.unchanged()
        )

    def hooked(self) -> bool:
        """Whether a module of the blocks has a forward hook (the blocks must then run as modules)."""
        return any(self.hook_dicts)

    def run(self, x_BSD: Tensor, past: int, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        """x [B, 1, D] after every block, the new position's keys and values written into the cache at `past`
        (the cache's length); cos_SR, sin_SR: the float32 RoPE table rows [1, R] of that position."""
        B, D = self.B, self.D
        step = self.step
        step.threads = torch.get_num_threads()
        rope = (cos_SR.data_ptr(), sin_SR.data_ptr(), cos_SR.shape[-1])
        x_BD = x_BSD.reshape(B, D)  # the residual stream; a block's input is kept until the block is done
        for layer in self.layers:
            if layer.qkv_native and layer.o_native:
                x_mid = self.residual[layer.index % 2]
                status = self.attention_half(layer.ref, self.step_ref, x_BD.data_ptr(), x_mid.data_ptr(), past, *rope)
                cpu_kernels.check_status(status, "decode_attention_half")
            else:
                x_mid = self._attention_half(layer, x_BD, past, rope, step.threads)
            if layer.moe is None:
                x_mid.add_(layer.block.ffn(self.buffers["h"].view(B, 1, D)).view(B, D))  # the same rounding
            else:
                status = self.moe_half(layer.ref, self.step_ref, x_mid.data_ptr())
                if status in (-5, -6):  # not finite: the modules, from this block's input, raise the error
                    return self._modules_from(layer.index, x_BD.view(B, 1, D), cos_SR, sin_SR)
                cpu_kernels.check_status(status, "decode_moe_half")
                layer.moe_dict["_aux_loss"], layer.moe_dict["_stats_state"] = None, layer.moe_state
            x_BD = x_mid
        return x_BD.view(B, 1, D)

    def _attention_half(self, layer: _Layer, x_BD: Tensor, past: int, rope: tuple, threads: int) -> Tensor:
        """What `sparsemoe_decode_attention_half` computes, for a block with a projection below the native
        kernel's size (run on F.linear, as the modules run it) -> x_mid [B, D] (h: the feed-forward's input)."""
        B, D = self.B, self.D
        h, att = self.buffers["h"], self.buffers["att"]
        args = layer.args
        self.rms_norm(x_BD.data_ptr(), args.attn_norm, B, D, args.attn_eps, h.data_ptr(), threads)
        if layer.qkv_native:
            status = self.linear_many(h.data_ptr(), self.half, B, D, 3, args.qkv, args.qkv_rows, self.qkv_out,
                                      self.half, threads)  # fmt: skip
            cpu_kernels.check_status(status, "linear_many")
            qkv = tuple(self.qkv_out)
        else:
            q, k, v = (F.linear(h.view(B, 1, D), w) for w in layer.qkv_weights)
            qkv = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        cos, sin, R = rope if args.rope else (None, None, self.Hd)
        status = self.attention(*qkv, cos, sin, args.cache_k, args.cache_v, B, self.H, self.G, self.Hd, R,
                                args.cache_len, past, args.window, args.scale, att.data_ptr(), threads)  # fmt: skip
        cpu_kernels.check_status(status, "decode_attention")
        if layer.o_native:
            status = self.linear_many(att.data_ptr(), self.half, B, self.H * self.Hd, 1, *layer.o_proj, self.o_out,
                                      self.half, threads)  # fmt: skip
            cpu_kernels.check_status(status, "linear_many")
            x_mid = x_BD + self.buffers["o"]
        else:
            x_mid = x_BD + F.linear(att.view(B, 1, self.H * self.Hd), layer.o_weight).view(B, D)
        self.rms_norm(x_mid.data_ptr(), args.ffn_norm, B, D, args.ffn_eps, h.data_ptr(), threads)
        return x_mid

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
