"""Where and in which precision a model runs: the device and precision choices, made in one place.

Every command that runs a model (`train`, `generate`, `inspect`, `bench`, `profile`) takes the same
`--device` (see `resolve_device`); training takes `--precision` (see `resolve_precision`) and the rest a
weight dtype. What each choice turns on:

| device | precision | what runs                                                                        |
|--------|-----------|----------------------------------------------------------------------------------|
| cpu    | fp32      | float32 everywhere (the default on the CPU)                                      |
| cpu    | bf16      | bfloat16 autocast for the forward; weights, gradients and AdamW stay float32     |
| cuda   | bf16      | the same autocast (the default on CUDA), fused AdamW, the Triton expert kernels  |
| cuda   | fp32      | float32 weights and activations with TF32 tensor-core matmuls allowed            |

float16 is not offered: its narrow range needs a loss scaler (torch.amp.GradScaler) to keep small
gradients from flushing to zero; bfloat16 has float32's range and trains without one.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Optional, Union

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on CUDA, fp32 elsewhere
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DeviceError(ValueError):
    """A device that cannot be used here: unknown, absent, or too small for what was asked of it."""


def resolve_device(name: Union[str, torch.device, None] = "auto", allow_meta: bool = False) -> torch.device:
    """The torch.device for `name`: "auto" (CUDA when available, else the CPU), "cpu", "cuda" (the
    current CUDA device) or "cuda:N"; "meta" only with `allow_meta` (shapes without memory).

    Raises DeviceError naming what was wrong: an unknown name, CUDA without a CUDA GPU, an index past
    the GPUs there are.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {str(name)!r} is not a device; accepted: {DEVICE_CHOICES}") from None
    if device.type == "meta" and allow_meta:
        return device
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {str(name)!r} is not supported; accepted: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} was asked for, but no CUDA GPU is available here; use cpu (or auto)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DeviceError(
            f"device {str(name)!r} does not exist: there {'is' if count == 1 else 'are'} {count} CUDA "
            f"GPU{'' if count == 1 else 's'} here (cuda:0{'' if count == 1 else f'..cuda:{count - 1}'})"
        )
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for a precision of PRECISIONS on `device` ("auto": bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is invalid: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The forward's autocast context for a resolved precision: bfloat16 autocast for "bf16", none for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def configure_matmuls(device: torch.device, precision: str) -> None:
    """Allow TF32 tensor-core matmuls for float32 work on CUDA (10-bit mantissa products, float32
    accumulation: the usual setting for training); the CPU is left as it is."""
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe_device(device: torch.device) -> str:
    """A short name for reports: "NVIDIA H200 (cuda:0, 139.8 GiB)", "CPU (2 threads)"."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({device}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "meta":
        return "meta (shapes only)"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes that an allocation on `device` may still take: what the CUDA driver reports free on a GPU,
    the kernel's MemAvailable on the CPU; None where it cannot be known (the meta device, no /proc)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Dense (no structured sparsity) tensor-core peaks by the vendors' datasheets, TFLOP/s: bfloat16, and TF32
# for float32 work. First match of the device name wins, so the PCIe H100 comes before the SXM one.
_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("H800", {"bf16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
)


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The device's dense peak in TFLOP/s for a resolved precision, where it is known (the GPUs above);
    None elsewhere (give it yourself, e.g. `sparsemoe train --peak-tflops`)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in _PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None
