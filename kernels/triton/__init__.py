"""Triton chunk kernels (CUDA). Importable without a GPU; ``is_available`` says whether they can run."""
from __future__ import annotations

__all__ = ['is_available']


def is_available() -> bool:
    """The Triton backend is not implemented yet (issue: Triton chunk kernels); CUDA falls back to torch."""
    return False
