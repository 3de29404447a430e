"""`sparsemoe quantize`: a checkpoint with its expert weights stored as int8 or int4, for inference."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sparsemoe.commands import CommandError
from sparsemoe.commands._measure import positive_int

SCHEMES = ("int8", "int4")  # sparsemoe.quant.SCHEMES, spelt out so that `sparsemoe --help` need not import torch


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="store a checkpoint's expert weights as int8 or int4 (weight-only) for fast inference",
        description="Read a sparsemoe run or checkpoint folder (or a Hugging Face MoE folder), store every MoE "
        "layer's expert weights quantized, and write a checkpoint that `sparsemoe generate`, `inspect` and "
        "`bench --checkpoint` run. int8: one float32 scale per output channel (1 byte per weight); int4: one "
        "bfloat16 scale per --group-size input columns, two weights per byte. Routers, norms, attention and "
        "embeddings stay as they are. The native CPU decode kernel reads the quantized bytes directly; large "
        "batches dequantize the experts they use. Quantized checkpoints are for inference: `train --resume` "
        "refuses them.",
    )
    p.add_argument("src", metavar="SRC", help="sparsemoe run or checkpoint folder, or a Hugging Face MoE folder")
    p.add_argument("out", metavar="OUT", help="output run folder (created; must hold no checkpoint unless --overwrite)")
    p.add_argument("--to", choices=SCHEMES, required=True, help="the scheme: int8 or int4")
    p.add_argument("--group-size", type=positive_int, default=None, metavar="N",
                   help="int4: input columns per scale, a multiple of 32 (default 64); smaller is more accurate "
                   "and reads 2/N more bytes per weight")  # fmt: skip
    p.add_argument("--no-shared", action="store_true", help="leave shared experts in floating point")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the weights that stay floating point and of the computation (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check SRC's files against their SHA-256 checksums (checked by default)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from sparsemoe.quant import QuantizationError, quantization_of, quantize
    from sparsemoe.train.checkpoint import LATEST

    if args.to == "int8" and args.group_size is not None:
        raise CommandError("--group-size applies to int4 only (int8 has one scale per output channel)")
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise CommandError(f"{str(src)!r} does not exist")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CommandError("OUT must be a new folder, not SRC or a folder inside it")
    if (out / "checkpoints" / LATEST).exists() and not args.overwrite:
        raise CommandError(f"{str(out)!r} already holds a checkpoint; give --overwrite to replace it")
    from sparsemoe.hf.convert import is_hf_folder, save_converted_checkpoint

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf_folder = is_hf_folder(src)
    model, source = _load(src, hf_folder, dtype, not args.no_verify)
    try:
        quantize(model, args.to, args.group_size, shared=not args.no_shared)
    except QuantizationError as err:
        raise CommandError(str(err)) from None
    if args.overwrite and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    q = quantization_of(model)
    ckpt = save_converted_checkpoint(model, out, {"quantization": q, "quantized_from": source})
    _copy_tokenizer(src, hf_folder, out)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    group = f", group size {q['group_size']}" if q["scheme"] == "int4" else ""
    print(f"quantized the experts to {q['scheme']}{group}: the model's tensors now take {stored / 2**20:,.1f} MiB")
    print(f"wrote {ckpt}")
    sys.stdout.flush()
    return 0


def _load(src: Path, hf_folder: bool, dtype, verify: bool):
    """(float model in eval mode, a description of the source for trainer.json)."""
    from sparsemoe.train import CheckpointError
    from sparsemoe.train.checkpoint import checkpoint_quantization, load_meta, load_model, resolve_checkpoint

    if hf_folder:
        from sparsemoe.hf import load_hf
        from sparsemoe.hf.io import HFFormatError

        try:
            loaded = load_hf(src, dtype=dtype)
        except HFFormatError as err:
            raise CommandError(str(err)) from None
        return loaded.model, {"format": "huggingface", "family": loaded.mapped.family, "path": src.name}
    try:
        quantized = checkpoint_quantization(load_meta(resolve_checkpoint(src), verify), src)
        if quantized:
            raise CommandError(f"{str(src)!r} is quantized already ({quantized['scheme']}); quantize the float checkpoint")
        model, meta = load_model(src, dtype=dtype, verify=verify)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    return model, {"format": "sparsemoe", "path": src.name, "step": meta.get("step")}


def _copy_tokenizer(src: Path, hf_folder: bool, out: Path) -> None:
    """The source's tokenizer goes with the checkpoint, so that `generate` finds it."""
    from sparsemoe.hf.tokenizer import copy_tokenizer_files, find_tokenizer_dir

    folder = src if hf_folder else find_tokenizer_dir(src)
    if folder is not None:
        copy_tokenizer_files(folder, out)
