"""Checkpoints: safetensors for tensors, JSON for the rest, written so that an interrupted save is harmless.

Layout of a run folder's checkpoints:

    checkpoints/step-000300/model.safetensors      the model's state dict (see sparsemoe.model.transformer)
    checkpoints/step-000300/optimizer.safetensors  optimizer tensors "state.{param index}.{name}" and RNG
                                                   states "rng.{name}" (uint8 byte strings)
    checkpoints/step-000300/trainer.json           model_config, train_config, step, optimizer
                                                   param_groups and scalars, file sizes, extra state
    checkpoints/step-000300/checksums.sha256       SHA-256 of the three files above, in `sha256sum`'s format
    checkpoints/latest                             the name of the newest complete checkpoint

Why it survives Ctrl-C or kill at any moment: a checkpoint is written into a temporary folder, its
files flushed to disk, and only then renamed to its final name (a rename is atomic); `latest` is
then replaced atomically (write a temporary file, `os.replace`). A crash leaves at worst a stray
temporary folder, never a `latest` that points to a partial checkpoint. trainer.json records each
file's size, so a file truncated afterwards (a full disk, a bad copy) is reported, not half-loaded.

Why changed bytes are caught too: checksums.sha256 holds the SHA-256 of every file the checkpoint wrote
(`cd step-000300 && sha256sum -c checksums.sha256` checks it by hand). Loading verifies the files it reads
(`verify=True`, the default everywhere; `--no-verify` on the commands): a flipped bit, a file copied from
another checkpoint or a damaged disk gives one CheckpointError naming the file, before a tensor is used.
SHA-256 runs at about 1.8 GB/s per core here, on both files at once when saving (`tools/checksum_cost.py`
measures what it adds to the largest preset). Checkpoints written before checksums existed (format /1)
load with the size checks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

FORMAT = "sparsemoe-checkpoint/2"  # /2 adds checksums.sha256
FORMATS = ("sparsemoe-checkpoint/1", FORMAT)  # what loads (/1: sizes checked, no checksums to verify)
MODEL_FILE, OPTIMIZER_FILE, META_FILE, LATEST = "model.safetensors", "optimizer.safetensors", "trainer.json", "latest"
CHECKSUMS = "checksums.sha256"
_HASH_CHUNK = 16 << 20  # bytes read per update: hashlib releases the GIL on large updates


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or from another config."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path, names: tuple[str, ...]) -> None:
    """checksums.sha256 in `folder` for the files `names` (hashed in parallel threads)."""
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        digests = list(pool.map(lambda name: file_sha256(folder / name), names))
    _write_text_atomic(folder / CHECKSUMS, "".join(f"{d}  {name}\n" for d, name in zip(digests, names)))


def read_checksums(ckpt_dir: Path) -> Optional[dict[str, str]]:
    """{file name: SHA-256} from checksums.sha256, or None when the checkpoint has none."""
    path = ckpt_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        sums = {}
        for line in lines:
            digest, name = line.split(None, 1)
            sums[name.strip().lstrip("*")] = digest.lower()
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt ({err})") from None
    return sums


def verify_file(ckpt_dir: Path, name: str, checksums: Optional[dict[str, str]]) -> None:
    """Raise CheckpointError unless file `name` has the SHA-256 its checkpoint recorded (None: none recorded)."""
    if checksums is None:
        return
    path = ckpt_dir / name
    expected = checksums.get(name)
    if expected is None:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {CHECKSUMS} lists no checksum for {name}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    if file_sha256(path) != expected:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not match its checksum in {CHECKSUMS}: its bytes changed after "
            "it was written (a damaged disk or copy, or a file from another checkpoint); use an intact copy, or "
            "--no-verify to load it anyway"
        )


def verify_files(ckpt_dir: Path, names: tuple[str, ...], checksums: Optional[dict[str, str]]) -> None:
    """`verify_file` for several files at once (one thread each: hashing releases the GIL)."""
    if checksums is not None:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(lambda name: verify_file(ckpt_dir, name, checksums), names))


def commit_checkpoint(tmp: Path, final: Path, names: tuple[str, ...]) -> None:
    """Checksum, flush and publish a checkpoint written into `tmp`: rename it to `final` (atomic), then
    point `latest` at it. A crash before the rename leaves only a stray temporary folder."""
    write_checksums(tmp, names)
    for name in (*names, CHECKSUMS):
        _fsync_file(tmp / name)
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(final.parent / LATEST, final.name + "\n")


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    checkpoints_dir: Union[str, Path],
    step: int,
    model_state: dict[str, Tensor],
    optimizer_state: Optional[dict[str, Any]],
    meta: dict[str, Any],
    rng_states: Optional[dict[str, Tensor]] = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`. Returns its folder."""
    from safetensors.torch import save_file

    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    extra: dict[str, Tensor] = {f"rng.{k}": v.cpu() for k, v in (rng_states or {}).items()}
    meta = dict(meta, format=FORMAT, step=step)
    if optimizer_state is not None:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
        extra.update(opt_tensors)
        meta["optimizer"] = opt_meta
    save_file(extra, str(tmp / OPTIMIZER_FILE))
    meta["files"] = {name: (tmp / name).stat().st_size for name in (MODEL_FILE, OPTIMIZER_FILE)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    commit_checkpoint(tmp, final, (MODEL_FILE, OPTIMIZER_FILE, META_FILE))
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp-step-*"):  # left by a save that was killed
        if not stray.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stray, ignore_errors=True)


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A run folder, its checkpoints folder, or one checkpoint folder -> that checkpoint's folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a run folder or a checkpoint folder")
    if (p / META_FILE).exists() or (p / MODEL_FILE).exists():
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST
        if latest.is_file():
            try:
                name = latest.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                raise CheckpointError(
                    f"{str(latest)!r} is corrupt ({err}); it should hold the name of a checkpoint folder beside "
                    "it, e.g. step-000300: write that name into it, or give that folder"
                ) from None
            target = root / name
            if not name or "/" in name or not target.is_dir():
                raise CheckpointError(f"{str(latest)!r} points to {name!r}, which is missing")
            return target
    raise CheckpointError(f"no checkpoint found in {str(path)!r} (expected checkpoints/{LATEST} or {META_FILE})")


def has_checkpoint(run_dir: Union[str, Path]) -> bool:
    return (Path(run_dir) / "checkpoints" / LATEST).is_file()


def load_meta(ckpt_dir: Path, verify: bool = True) -> dict[str, Any]:
    """trainer.json of a checkpoint folder, checked: its checksum (with `verify`), format, step and the
    recorded sizes of the tensor files. The tensor files' checksums are verified where they are read."""
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {META_FILE}")
    checksums = read_checksums(ckpt_dir) if verify else None
    verify_file(ckpt_dir, META_FILE, checksums)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} is corrupt or truncated ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(f"{str(meta_path)!r} is not a sparsemoe checkpoint (format {FORMAT!r} expected)")
    if verify and meta["format"] == FORMAT and checksums is None:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} has no {CHECKSUMS} (every checkpoint of format {FORMAT} has one); "
            "use an intact copy, or --no-verify to load it anyway"
        )
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} has no valid step (found {step!r})")
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} has no valid file list")
    for name, size in files.items():
        path = ckpt_dir / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes, expected {size}"
            raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupt ({what})")
    return meta


def load_tensors(path: Path, verify: bool = True) -> dict[str, Tensor]:
    """A checkpoint's tensor file, its checksum verified first (with `verify`, where one was recorded)."""
    from safetensors.torch import load_file

    if verify:
        verify_file(path.parent, path.name, read_checksums(path.parent))
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except Exception as err:  # safetensors raises its own error types for a bad header or short file
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated ({err})") from None


def load_checkpoint(path: Union[str, Path], with_optimizer: bool = True, verify: bool = True) -> dict[str, Any]:
    """{"dir", "meta", "model" (state dict), and with_optimizer: "optimizer" (state dict), "rng" (dict)}.

    verify: check every file read against checksums.sha256 (CheckpointError naming the file that differs).
    """
    ckpt_dir = resolve_checkpoint(path)
    meta = load_meta(ckpt_dir, verify)
    if verify:
        verify_files(ckpt_dir, (MODEL_FILE, OPTIMIZER_FILE) if with_optimizer else (MODEL_FILE,), read_checksums(ckpt_dir))
    out: dict[str, Any] = {"dir": ckpt_dir, "meta": meta, "model": load_tensors(ckpt_dir / MODEL_FILE, False)}
    if with_optimizer:
        extra = load_tensors(ckpt_dir / OPTIMIZER_FILE, False)
        out["rng"] = {k[4:]: v for k, v in extra.items() if k.startswith("rng.")}
        out["optimizer"] = optimizer_from_flat(extra, meta["optimizer"]) if "optimizer" in meta else None
    return out


def load_model(
    path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
    verify: bool = True,
):
    """(MoETransformer in eval mode, checkpoint meta) from a run folder or checkpoint folder.

    The model is built on the meta device and materialised on `device` (in `dtype`, default the dtype the
    checkpoint stores its embedding in: float32 for a training run, bfloat16 for a bfloat16 conversion or
    quantization) before the weights are copied in (`sparsemoe.model.empty_model`): no random
    initialisation, no second copy on the host. Checkpoints hold no device: one written on CUDA loads on
    the CPU and the other way round.
    """
    from sparsemoe.model import ModelConfig, empty_model

    ckpt = load_checkpoint(path, with_optimizer=False, verify=verify)
    try:
        config = ModelConfig.from_dict(ckpt["meta"]["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(ckpt['dir'])!r} has no usable model_config ({err})") from None
    dtype = dtype or stored_dtype(ckpt["model"])
    model = empty_model(config, dtype, device, checkpoint_quantization(ckpt["meta"], ckpt["dir"]))
    load_model_state(model, ckpt["model"], ckpt["dir"])
    return model.eval(), ckpt["meta"]


def stored_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The float dtype a checkpoint's model state is stored in (its embedding's; float32 if it has none)."""
    embed = state.get("embed.weight")
    return embed.dtype if embed is not None and embed.is_floating_point() else torch.float32


def refuse_quantized(meta: dict[str, Any], where: Union[str, Path]) -> None:
    """Training cannot continue from a quantized checkpoint (its experts are no parameters): one clear error."""
    if meta.get("quantization"):
        raise CheckpointError(f"checkpoint {str(where)!r} is quantized (inference only); resume from the float "
                              "checkpoint it was made from")


def checkpoint_quantization(meta: dict[str, Any], where: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The "quantization" entry of a quantized checkpoint's trainer.json ({"scheme", "group_size", "shared"};
    written by `sparsemoe quantize`), checked; None for a float checkpoint."""
    from sparsemoe.quant import QuantizationError, QuantScheme

    quant = meta.get("quantization")
    if quant is None:
        return None
    try:
        if not isinstance(quant, dict) or not isinstance(quant.get("shared", True), bool):
            raise QuantizationError(f"expected {{'scheme', 'group_size', 'shared'}}, got {quant!r}")
        QuantScheme.make(quant.get("scheme"), quant.get("group_size") or None)
    except QuantizationError as err:
        raise CheckpointError(f"checkpoint {str(where)!r} has an unusable quantization entry: {err}") from None
    return quant


def load_model_state(model, state: dict[str, Tensor], where: Union[str, Path]) -> None:
    """Load a state dict, turning missing/unexpected/mis-shaped tensors into one CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(where)!r} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[0]}: "
            "the run diverged before it was saved, or the file was damaged; use an earlier checkpoint"
        )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:2]}")
        raise CheckpointError(f"checkpoint {str(where)!r} does not match this model config: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except ValueError as err:  # a quantized weight's stored data or scales that do not fit (QuantizationError)
        raise CheckpointError(f"checkpoint {str(where)!r}: {err}") from None
