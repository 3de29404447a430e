"""Whole-model inference beside transformers and llama.cpp: prefill and greedy decode of the same weights.

    result = run_inference_bench(InferenceBenchOptions())      # `sparsemoe bench --inference`

For each model (`MODEL_SHAPES` of `sparsemoe.bench.quant`, e.g. mixtral-1k, or a `sparsemoe.model` preset
such as demo; random weights, seed 0) and each scheme, every engine runs the same weights:

* sparsemoe: our `MoETransformer` (float32; bfloat16; int8 / int4: the experts quantized by
  `sparsemoe.quant.quantize`, every other weight and the computation in bfloat16);
* transformers eager / transformers grouped_mm (float32 and bfloat16): the model exported as a Mixtral
  folder (`sparsemoe.hf.export`) and loaded with transformers, its experts_implementation set to each;
* llama.cpp (where llama-cpp-python is installed): the model written as GGUF (`sparsemoe.hf.gguf`: f32,
  bf16, or q8_0 / q4_0 experts with the rest bf16 for int8 / int4) and run through its Python binding.

Timed, calls interleaved engine by engine round after round (the minimum of `repeats` rounds):
* prefill: one forward of `prefill_tokens` tokens (batch 1) that fills the KV cache; tokens/s;
* decode: greedy generation after a `prompt_tokens`-token prompt; ms per token =
  (t(N tokens) - t(1 token)) / (N - 1) for N = `decode_tokens`, which leaves the prompt and set-up out;
* the weight-read bound of a decode step: the bytes it must read (every weight but the experts a token is
  not routed to, one row of the embedding table; in each engine's own storage) at the copy bandwidth
  measured in the same run; "of bound" = bound / ms per token (a read-only stream can beat a copy a
  little, so 1.0 is a yardstick, not a wall).

Before timing, each engine's last-position prefill logits are compared with sparsemoe's in the same scheme
(relative max difference); in float32 a difference past `FLOAT32_TOLERANCE` is an error (a wrong layout,
not rounding). In bfloat16 and the quantized schemes rounding may flip a near-tied routing choice of a
random model, so there the figure is only reported.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsemoe.bench.measure import copy_bandwidth, environment, time_interleaved
from sparsemoe.bench.report import format_ms
from sparsemoe.bench.quant import MODEL_SHAPES, decode_bytes_per_token
from sparsemoe.model import PRESETS, ModelConfig, MoETransformer, generate
from sparsemoe.ops.memory import move_to_huge_pages
from sparsemoe.quant import quantize

SCHEMES = ("float32", "bfloat16", "int8", "int4")
ENGINES = ("sparsemoe", "transformers eager", "transformers grouped_mm", "llama.cpp")
MODELS = tuple(MODEL_SHAPES) + tuple(PRESETS)
GGUF_WEIGHTS = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}
FLOAT32_TOLERANCE = {"transformers eager": 1e-4, "transformers grouped_mm": 1e-4, "llama.cpp": 1e-2}
INT4_GROUP = 64


@dataclass
class InferenceBenchOptions:
    models: tuple[str, ...] = ("mixtral-1k", "demo")
    schemes: tuple[str, ...] = SCHEMES
    engines: tuple[str, ...] = ENGINES
    prefill_tokens: int = 256
    prompt_tokens: int = 16
    decode_tokens: int = 32
    repeats: int = 3
    clock: str = "wall"


@dataclass
class Engine:
    """One way of running the model: prefill(ids [1, P]) -> last logits [V] float32; generate(prompt [1, S],
    n) greedy; decode_bytes: what one decode step reads of its weights."""

    name: str
    prefill: Callable[[Tensor], Tensor]
    generate: Callable[[Tensor, int], None]
    decode_bytes: int
    detail: str = ""


def model_config(name: str) -> ModelConfig:
    if name in MODEL_SHAPES:
        return ModelConfig(**MODEL_SHAPES[name])
    if name in PRESETS:
        return ModelConfig(**PRESETS[name])
    raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")


def random_model(name: str) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(model_config(name)).eval()


def scheme_model(model: MoETransformer, scheme: str) -> MoETransformer:
    """Our model in `scheme` (a copy; float32 is `model` itself)."""
    if scheme == "float32":
        return model
    half = copy.deepcopy(model).to(torch.bfloat16)
    if scheme == "bfloat16":
        return half
    return quantize(half, scheme, INT4_GROUP if scheme == "int4" else None)


def sparsemoe_engine(model: MoETransformer) -> Engine:
    move_to_huge_pages(model)  # as `sparsemoe generate` runs it

    def prefill(ids: Tensor) -> Tensor:
        with torch.no_grad():
            return model(ids, cache=model.new_cache(1), last_only=True).logits[0, -1].float()

    def run(prompt: Tensor, n: int) -> None:
        generate(model, prompt, n, temperature=0)

    return Engine("sparsemoe", prefill, run, decode_bytes_per_token(model))


def transformers_engines(model: MoETransformer, names: list[str], folder: Path) -> list[Engine]:
    """The model exported as a Mixtral folder and loaded by transformers, once per experts implementation."""
    from transformers import AutoModelForCausalLM

    from sparsemoe.hf.export import export_hf

    dtype = model.embed.weight.dtype
    export_hf(model, folder, family="mixtral", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    move_to_huge_pages(hf)  # as ours: the same page size for every engine (llama.cpp maps its file)
    nbytes = decode_bytes_per_token(model)  # the same tensors in the same dtype
    engines = []
    for name in names:
        implementation = name.split(" ", 1)[1]

        def prefill(ids: Tensor, implementation=implementation) -> Tensor:
            hf.set_experts_implementation(implementation)
            with torch.no_grad():
                return hf(input_ids=ids, logits_to_keep=1).logits[0, -1].float()

        def run(prompt: Tensor, n: int, implementation=implementation) -> None:
            hf.set_experts_implementation(implementation)
            with torch.no_grad():
                hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        engines.append(Engine(name, prefill, run, nbytes))
    return engines


def llama_cpp_available() -> Optional[str]:
    """None when llama-cpp-python and gguf import, else why not."""
    for module, extra in (("llama_cpp", "llamacpp"), ("gguf", "gguf")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'sparsemoe[{extra}]')"
    return None


def llama_cpp_engine(model: MoETransformer, scheme: str, path: Path, context: int, batch: int) -> Engine:
    """`model` (float32) written as GGUF in the scheme's weights and loaded by llama.cpp."""
    import llama_cpp
    import numpy as np

    from sparsemoe.hf.gguf import decode_bytes_of_gguf, export_gguf

    weights = GGUF_WEIGHTS[scheme]
    export_gguf(model, path, weights)
    threads = torch.get_num_threads()
    kv = {"type_k": 0, "type_v": 0} if scheme == "float32" else {}  # GGML_TYPE_F32 keys and values in float32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=batch, n_ubatch=batch, n_threads=threads,
                n_threads_batch=threads, verbose=False, **kv)  # fmt: skip

    def last_logits():  # the binding keeps no logits of its own unless asked for every position's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def prefill(ids: Tensor) -> Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(last_logits().copy())

    def run(prompt: Tensor, n: int) -> None:
        llm.reset()
        llm.eval(prompt[0].tolist())
        for i in range(n):
            token = int(np.argmax(last_logits()))
            if i < n - 1:
                llm.eval([token])

    c = model.config
    nbytes = decode_bytes_of_gguf(path, c.top_k, c.num_experts)
    return Engine("llama.cpp", prefill, run, nbytes, detail=f"GGUF {weights}")


def _engines(model: MoETransformer, scheme: str, opts: InferenceBenchOptions, folder: Path, skipped: dict) -> list[Engine]:
    ours = scheme_model(model, scheme)
    engines = [sparsemoe_engine(ours)] if "sparsemoe" in opts.engines else []
    hf_names = [e for e in opts.engines if e.startswith("transformers ")]
    if hf_names and scheme in ("float32", "bfloat16"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            skipped["transformers"] = "transformers is not installed (pip install 'sparsemoe[hf]')"
        else:
            engines += transformers_engines(ours, hf_names, folder / f"hf-{scheme}")
    if "llama.cpp" in opts.engines:
        reason = llama_cpp_available()
        if reason is None:
            c = model.config
            batch = min(opts.prefill_tokens, c.max_seq_len)
            engines.append(llama_cpp_engine(model, scheme, folder / f"model-{scheme}.gguf", c.max_seq_len, batch))
        else:
            skipped["llama.cpp"] = reason
    return engines


def _case(name: str, scheme: str, opts: InferenceBenchOptions, bandwidth: float, skipped: dict) -> dict:
    model = random_model(name)
    c = model.config
    prefill_tokens = min(opts.prefill_tokens, c.max_seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (1, prefill_tokens), generator=gen)
    prompt = ids[:, : opts.prompt_tokens]
    with tempfile.TemporaryDirectory(prefix="sparsemoe-inference-") as tmp:
        engines = _engines(model, scheme, opts, Path(tmp), skipped)
        reference = engines[0].prefill(ids) if engines and engines[0].name == "sparsemoe" else None
        errors = {}
        for engine in engines[1:] if reference is not None else []:
            got = engine.prefill(ids)
            errors[engine.name] = ((got - reference).abs().max() / reference.abs().max()).item()
            limit = FLOAT32_TOLERANCE.get(engine.name)
            if scheme == "float32" and limit is not None and errors[engine.name] > limit:
                raise RuntimeError(f"{name}: {engine.name}'s float32 logits differ from sparsemoe's by "
                                   f"{errors[engine.name]:.3g} (relative), past {limit}")  # fmt: skip
        fns = {}
        for e in engines:
            fns[("prefill", e.name)] = lambda e=e: e.prefill(ids)
            fns[("decode1", e.name)] = lambda e=e: e.generate(prompt, 1)
            fns[("decodeN", e.name)] = lambda e=e: e.generate(prompt, opts.decode_tokens)
        timings = time_interleaved(fns, opts.repeats, clock=opts.clock)
    rows = []
    for e in engines:
        prefill_ms = timings["prefill", e.name]["min_ms"]
        decode_ms = (timings["decodeN", e.name]["min_ms"] - timings["decode1", e.name]["min_ms"]) / (opts.decode_tokens - 1)
        bound_ms = e.decode_bytes / bandwidth * 1e3
        rows.append({
            "engine": e.name, "weights": e.detail, "prefill_ms": prefill_ms,
            "prefill_tokens_per_s": prefill_tokens / prefill_ms * 1e3, "decode_ms_per_token": decode_ms,
            "decode_tokens_per_s": 1e3 / decode_ms if decode_ms > 0 else float("inf"),
            "decode_bytes": e.decode_bytes, "bound_ms": bound_ms,
            "bound_fraction": bound_ms / decode_ms if decode_ms > 0 else float("inf"),
            "logits_vs_sparsemoe": errors.get(e.name),
        })  # fmt: skip
    return {
        "model": name, "scheme": scheme, "parameters": model.num_params(), "active_parameters": model.num_active_params(),
        "prefill_tokens": prefill_tokens, "rows": rows,
    }  # fmt: skip


def run_inference_bench(opts: InferenceBenchOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    """{"options", "environment", "copy_bandwidth_gbs", "cases": [{"model", "scheme", "rows"}], "skipped"}."""
    if opts.decode_tokens < 2:
        raise ValueError(f"decode_tokens={opts.decode_tokens}: at least 2 (the first token is the prompt's)")
    unknown = [e for e in opts.engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; accepted: {', '.join(ENGINES)}")
    for name in opts.models:
        model_config(name)  # an unknown name fails before anything is timed
    bandwidth = copy_bandwidth()
    cases, skipped = [], {}
    for name in opts.models:
        for scheme in opts.schemes:
            progress(f"{name} {scheme}")
            start = time.perf_counter()
            cases.append(_case(name, scheme, opts, bandwidth, skipped))
            cases[-1]["seconds"] = time.perf_counter() - start
    env = environment(torch.device("cpu"))
    env["clock"] = opts.clock
    env["llama_cpp"] = _llama_cpp_version()
    return {"options": asdict(opts), "environment": env, "copy_bandwidth_gbs": bandwidth / 1e9, "cases": cases,
            "skipped": skipped}  # fmt: skip


def _llama_cpp_version() -> Optional[str]:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def inference_markdown(result: dict, command: str) -> str:
    opts, env = result["options"], result["environment"]
    lines = [
        "# sparsemoe bench --inference: whole models, prefill and greedy decode",
        "",
        f"Command: `{command}`",
        "",
        f"torch {env['torch']}, transformers {env.get('transformers')}, llama-cpp-python {env.get('llama_cpp')}, "
        f"python {env['python']}; {env['device_name']}, {env['threads']} threads; native CPU kernels "
        f"{env['cpu_kernels']}. Random weights. Prefill: one forward of the prompt (batch 1) filling the KV cache. "
        f"Decode: greedy after a {opts['prompt_tokens']}-token prompt, (t({opts['decode_tokens']} tokens) - "
        f"t(1)) / {opts['decode_tokens'] - 1}. Minimum of {opts['repeats']} interleaved rounds ({env['clock']} "
        "clock). Bound: the bytes one decode step reads (every weight but the experts it is not routed to, one "
        f"embedding row; in the engine's own storage) at the copy bandwidth measured in this run "
        f"({result['copy_bandwidth_gbs']:.1f} GB/s read + write); 'of bound' = bound / ms per token. 'logits': "
        "relative max difference of the last prefill position from sparsemoe's in the same scheme. int8 / int4: "
        "quantized experts, the rest bfloat16 (llama.cpp: q8_0 / q4_0 experts, the rest bf16).",
        "",
    ]
    for reason in result.get("skipped", {}).items():
        lines += [f"Skipped {reason[0]}: {reason[1]}.", ""]
    for case in result["cases"]:
        lines += [
            f"## {case['model']} ({case['parameters'] / 1e6:.0f} M parameters, {case['active_parameters'] / 1e6:.0f} M "
            f"active), {case['scheme']}",
            "",
            f"| engine | prefill {case['prefill_tokens']} ms | prefill tok/s | decode ms/token | decode tok/s "
            "| MB read per token | bound ms | of bound | logits |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in case["rows"]:
            err = row["logits_vs_sparsemoe"]
            name = row["engine"] + (f" ({row['weights']})" if row["weights"] else "")
            lines.append(
                f"| {name} | {format_ms(row['prefill_ms'])} | {row['prefill_tokens_per_s']:.0f} | "
                f"{format_ms(row['decode_ms_per_token'])} | {row['decode_tokens_per_s']:.1f} | {row['decode_bytes'] / 1e6:.1f} | "
                f"{format_ms(row['bound_ms'])} | {row['bound_fraction']:.2f} | {'' if err is None else f'{err:.1e}'} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
