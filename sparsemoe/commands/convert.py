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
        "read and written one at a time.",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face model folder, or sparsemoe run/checkpoint folder")
    p.add_argument("out", metavar="OUT", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--to", choices=("sparsemoe", "hf"), help="output format (default: the other one of SRC's)")
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
        help="sparsemoe -> HF: do not check the checkpoint's files against their SHA-256 checksums (checked by "
        "default)",
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
        if to == "sparsemoe":
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
