"""`sparsemoe convert`: Hugging Face MoE folder <-> sparsemoe checkpoint."""

from __future__ import annotations

import argparse
import re
import sys

from sparsemoe.commands import CommandError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def _size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500MB, 5GB or 1048576")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return max(1, int(float(match.group(1)) * scale))


# sparsemoe.hf.export.EXPORT_FAMILIES, spelt out so that `sparsemoe --help` need not import torch (a test checks).
HF_FORMATS = (
    "auto", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "granitemoeshared", "glm4_moe",
    "exaone_moe", "deepseek_v3", "deepseek_v2", "ernie4_5_moe", "afmoe",
)  # fmt: skip


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face MoE model to a sparsemoe checkpoint, or back to Hugging Face",
        description="Convert between Hugging Face MoE folders (config.json + safetensors) and sparsemoe checkpoints. "
        "HF -> sparsemoe reads Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, Granite-MoE (GraniteMoeShared too), "
        "DeepSeek-V2, DeepSeek-V3, GLM-4.5, dots.llm1, EXAONE-MoE, ERNIE 4.5, AFMoE and MiniMax-M2 folders and "
        "writes a checkpoint that `sparsemoe generate --checkpoint OUT` runs. sparsemoe -> HF writes a Mixtral, "
        "Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, Granite-MoE, GraniteMoeShared, GLM-4.5, EXAONE-MoE, DeepSeek-V3, "
        "DeepSeek-V2, ERNIE 4.5 or AFMoE folder (the first that expresses the model) that transformers loads. The "
        "direction is taken from SRC (a folder with config.json is Hugging Face) unless --to is given. Tensors are "
        "read and written one at a time. --to gguf writes a sparsemoe checkpoint that Mixtral expresses as a GGUF "
        "file for llama.cpp (needs the gguf package).",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face model folder, or sparsemoe run/checkpoint folder")
    p.add_argument("out", metavar="OUT", help="output folder (created; must be empty unless --overwrite); with "
                   "--to gguf the output file")
    p.add_argument("--to", choices=("sparsemoe", "hf", "gguf"),
                   help="output format (default: the other one of SRC's); gguf: a sparsemoe checkpoint as one GGUF "
                   "file that llama.cpp runs (Mixtral's layout in llama.cpp's 'llama' architecture)")
    p.add_argument("--gguf-weights", choices=("f32", "bf16", "q8_0", "q4_0"), default="bf16",
                   help="--to gguf: the weights' storage: f32, bf16 (default), or q8_0 / q4_0 experts in llama.cpp's "
                   "8-bit or 4-bit blocks with the other weights bf16")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (default auto: keep the source's dtype; bfloat16 for an FP8 checkpoint)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="HF -> sparsemoe: cap the context length (RoPE table, KV cache) below the model's max_position_embeddings",
    )
    p.add_argument(
        "--non-strict",
        action="store_true",
        help="HF -> sparsemoe: ignore checkpoint tensors the config "
        "does not account for instead of refusing the checkpoint",
    )
    p.add_argument(
        "--hf-format",
        choices=HF_FORMATS,
        default="auto",
        help="sparsemoe -> HF: the Hugging Face model type to write (default auto: the first of "
        + ", ".join(HF_FORMATS[1:])
        + " that expresses the model)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="sparsemoe -> HF: write transformers 5's fused 3-D expert "
        "tensors instead of the per-expert layout every transformers version reads",
    )
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=5 * 2**30,
        metavar="SIZE",
        help="sparsemoe -> HF: split the weights into files of at most SIZE (default 5GB)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the converted files already in OUT")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="sparsemoe -> HF or GGUF: do not check the checkpoint's files against their SHA-256 checksums "
        "(checked by default)",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sparsemoe.hf.convert import hf_to_sparsemoe, is_hf_folder, sparsemoe_to_hf
    from sparsemoe.hf.io import HFFormatError

    to = args.to or ("sparsemoe" if is_hf_folder(args.src) else "hf")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise CommandError(f"--max-seq-len {args.max_seq_len}: expected an integer >= 1")
    try:
        if to == "gguf":
            _to_gguf(args)
        elif to == "sparsemoe":
            ckpt, loaded = hf_to_sparsemoe(
                args.src,
                args.out,
                dtype=args.dtype,
                max_seq_len=args.max_seq_len,
                strict=not args.non_strict,
                overwrite=args.overwrite,
            )
            c = loaded.model.config
            print(
                f"read {loaded.mapped.family} ({loaded.layout} expert tensors): {c.n_layers} layers, "
                f"{len(c.moe_layer_ids)} MoE, {c.num_experts} experts, top-{c.top_k}, "
                f"{loaded.model.num_params():,} parameters"
            )
            for note in loaded.mapped.notes:
                print(f"note: {note}")
            print(f"wrote sparsemoe checkpoint {ckpt}")
        else:
            out, family = sparsemoe_to_hf(
                args.src,
                args.out,
                dtype=args.dtype,
                family=args.hf_format,
                fused=args.fused,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
                verify=not args.no_verify,
            )
            print(f"wrote Hugging Face {family} folder {out}")
    except HFFormatError as err:
        raise CommandError(str(err)) from None
    sys.stdout.flush()
    return 0


def _to_gguf(args) -> None:
    from pathlib import Path

    from sparsemoe.hf.convert import read_sparsemoe_checkpoint
    from sparsemoe.hf.gguf import export_gguf

    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"{out} is a folder: --to gguf writes one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out} exists; add --overwrite to replace it")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CommandError("--to gguf needs the gguf package: pip install 'sparsemoe[gguf]'") from None
    model = read_sparsemoe_checkpoint(args.src, verify=not args.no_verify)
    try:
        export_gguf(model, out, args.gguf_weights)
    except ValueError as err:
        raise CommandError(str(err)) from None
    c = model.config
    print(f"wrote GGUF ({args.gguf_weights}) {out}: {c.n_layers} layers, {c.num_experts} experts, top-{c.top_k}, "
          f"vocabulary {c.vocab_size}; run it with llama.cpp (llama-cli -m {out}) or llama-cpp-python")
