"""Autocast state, asked in a way that works for every device type (meta included)."""

from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast region active for `device_type`, or None outside one.

    `torch.is_autocast_enabled` raises for device types without autocast (the meta device, on which a
    model's forward is run to get shapes without memory), so those are asked first, in eager mode: the
    compiler cannot trace that question in every torch version (2.11's cannot), and traces fake tensors.
    """
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
