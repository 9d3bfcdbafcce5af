"""The operator chooses its own precision (fp32 states and accumulation, the solve's products at the accuracy it
needs); an autocast region around the caller must not re-cast the matmuls inside it. Under bf16 autocast the
30-step solve amplifies bf16 rounding of its matvecs by up to κ ≤ 51: the torch backend's output error vs float64
went from 2e-6 to 5e-2."""
from __future__ import annotations

import contextlib

import torch

__all__ = ['autocast_off']


def autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (a no-op for device types autocast does not know)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
