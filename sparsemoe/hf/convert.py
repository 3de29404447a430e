"""Conversions between Hugging Face folders and sparsemoe checkpoints (the functions behind `sparsemoe convert`).

A converted sparsemoe checkpoint has the layout `sparsemoe train` writes (see sparsemoe.train.checkpoint):

    OUT/checkpoints/step-000000/model.safetensors   the model's state dict
    OUT/checkpoints/step-000000/trainer.json        model_config, file sizes, where it came from
    OUT/checkpoints/latest

so `sparsemoe generate --checkpoint OUT` and `sparsemoe inspect --checkpoint OUT` read it. Both
directions hold one copy of the model in memory plus one tensor being read or written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sparsemoe.hf.export import export_family, export_hf
from sparsemoe.hf.io import INDEX_FILE, CheckpointFiles, HFFormatError, write_safetensors
from sparsemoe.hf.load import LoadedModel, load_hf, resolve_dtype
from sparsemoe.model import empty_model
from sparsemoe.hf.tokenizer import TOKENIZER_DIR, TOKENIZER_FILES, copy_tokenizer_files, find_tokenizer_dir


def is_hf_folder(path: Union[str, Path]) -> bool:
    """A Hugging Face model folder: a config.json, and not a sparsemoe run or checkpoint folder (a run of
    `sparsemoe train` has a config.json of its own beside checkpoints/)."""
    p = Path(path)
    from sparsemoe.train.checkpoint import LATEST, META_FILE

    own = (p / "checkpoints" / LATEST).is_file() or (p / META_FILE).is_file() or (p / LATEST).is_file()
    return (p / "config.json").is_file() and not own


def _fresh_dir(path: Path, overwrite: bool) -> None:
    """Make sure `path` can be written to without mixing old and new files."""
    if path.exists() and not path.is_dir():
        raise HFFormatError(f"output {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise HFFormatError(f"output folder {str(path)!r} is not empty; choose a new folder or overwrite it")
        # Only what a previous conversion wrote: never a whole unrelated folder.
        for name in ("checkpoints", "config.json", INDEX_FILE, TOKENIZER_DIR, *TOKENIZER_FILES):
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for stale in path.glob("*.safetensors"):
            stale.unlink()
    path.mkdir(parents=True, exist_ok=True)


def save_converted_checkpoint(model: nn.Module, out_dir: Union[str, Path], about: dict[str, Any]) -> Path:
    """Write `model` as a step-0 sparsemoe checkpoint under OUT/checkpoints (tensors streamed one at a time, no
    optimizer state: a run resumed from it starts its optimizer afresh), with `about` (where it came from, how
    it is quantized) beside its model_config in trainer.json; returns the checkpoint folder."""
    from sparsemoe.train.checkpoint import (
        FORMAT, META_FILE, MODEL_FILE, OPTIMIZER_FILE, commit_checkpoint, step_dir_name,
    )  # fmt: skip

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(0)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sizes = {
        MODEL_FILE: write_safetensors(tmp / MODEL_FILE, model.state_dict().items()),
        OPTIMIZER_FILE: write_safetensors(tmp / OPTIMIZER_FILE, []),  # no optimizer state: a fresh start
    }
    meta = {
        "format": FORMAT,
        "step": 0,
        "model_config": model.config.to_dict(),
        "files": sizes,
        **about,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    commit_checkpoint(tmp, final, (MODEL_FILE, OPTIMIZER_FILE, META_FILE))  # a crash leaves no half checkpoint
    return final


def hf_to_sparsemoe(
    src: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = "auto",
    max_seq_len: Optional[int] = None,
    strict: bool = True,
    overwrite: bool = False,
) -> tuple[Path, LoadedModel]:
    """Convert a Hugging Face folder to a sparsemoe checkpoint; returns (checkpoint folder, what was loaded)."""
    out = Path(out_dir)
    if out.resolve() == Path(src).resolve():
        raise HFFormatError("the output folder must differ from the Hugging Face folder")
    loaded = load_hf(src, dtype=dtype, max_seq_len=max_seq_len, strict=strict)
    _fresh_dir(out, overwrite)
    source = {
        "format": "huggingface",
        "family": loaded.mapped.family,
        "path": str(Path(src).name),
        "notes": loaded.mapped.notes,
    }
    checkpoint = save_converted_checkpoint(loaded.model, out, {"converted_from": source})
    copy_tokenizer_files(src, out)  # so that `sparsemoe generate --checkpoint OUT` can prompt it
    return checkpoint, loaded


def read_sparsemoe_checkpoint(
    path: Union[str, Path], dtype: Optional[torch.dtype] = None, verify: bool = True
) -> nn.Module:
    """A sparsemoe run or checkpoint folder's model, read tensor by tensor into place (eval mode).

    The same checks as `sparsemoe.train.checkpoint.load_model` (checksums with `verify`, format, file
    sizes, matching keys, finite values), but without loading the whole file beside the model.
    """
    from sparsemoe.model import ModelConfig
    from sparsemoe.train.checkpoint import (
        MODEL_FILE, CheckpointError, load_meta, read_checksums, resolve_checkpoint, verify_file,
    )  # fmt: skip

    try:
        ckpt_dir = resolve_checkpoint(path)
        meta = load_meta(ckpt_dir, verify)
        if verify:
            verify_file(ckpt_dir, MODEL_FILE, read_checksums(ckpt_dir))
        config = ModelConfig.from_dict(meta["model_config"])
    except CheckpointError as err:
        raise HFFormatError(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        raise HFFormatError(f"checkpoint {str(path)!r} has no usable model_config ({err})") from None
    model_file = ckpt_dir / MODEL_FILE
    if not model_file.is_file():
        raise HFFormatError(f"checkpoint file {str(model_file)!r} is missing")
    files = CheckpointFiles(ckpt_dir)
    files.weight_map = {k: v for k, v in files.weight_map.items() if v == model_file}
    model = empty_model(config, dtype or _stored_dtype(files), "cpu")
    state = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(state) - files.keys()), sorted(files.keys() - set(state))
    if missing or unexpected:
        raise HFFormatError(
            f"checkpoint {str(ckpt_dir)!r} does not match its model_config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        files.read_into(name, tensor)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HFFormatError(f"checkpoint {str(ckpt_dir)!r} holds NaN or infinite values in {name}")
    return model.eval()


def _stored_dtype(files: CheckpointFiles) -> torch.dtype:
    """The dtype of the checkpoint's embedding (float32 for anything unexpected)."""
    key = "embed.weight"
    return files.dtype(key) if key in files and files.dtype(key).is_floating_point else torch.float32


def sparsemoe_to_hf(
    src: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    family: str = "auto",
    fused: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    verify: bool = True,
) -> tuple[Path, str]:
    """Convert a sparsemoe run or checkpoint folder to a Hugging Face folder -> (folder, format written).

    family: one of sparsemoe.hf.export.EXPORT_FAMILIES, or "auto" (the first of them that expresses the model).
    verify: check the checkpoint's files against their checksums first.
    """
    model = read_sparsemoe_checkpoint(src, verify=verify)
    family = export_family(model, family)  # checked before the output folder is touched
    out = Path(out_dir)
    _fresh_dir(out, overwrite)
    cast = None if dtype in (None, "auto") else resolve_dtype(dtype)
    written = export_hf(model, out, family=family, dtype=cast, fused=fused, max_shard_bytes=max_shard_bytes)
    tokenizer = find_tokenizer_dir(src)
    if tokenizer is not None:  # the run's tokenizer leaves with it, where transformers.AutoTokenizer looks
        copy_tokenizer_files(tokenizer, out, subfolder="")
    return written, family
