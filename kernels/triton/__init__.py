"""Triton kernels of the GKA operator (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``).

Files by concern: ``state_pass`` (inter-chunk state recurrences), ``solve`` (fused Frobenius norm + Chebyshev
solve + readout per chunk, and the adjoint solve), ``backward`` (implicit gradient), ``decode`` (one token),
``function`` (the autograd.Function). Importing this package imports neither Triton nor a kernel module: Triton
fixes interpreter mode when a kernel is decorated, so the kernels are loaded on first use.
"""
from __future__ import annotations

import os

__all__ = ['is_available', 'supports', 'gka_chunk_triton', 'gka_step_triton']


def is_available() -> bool:
    """True when Triton imports and there is a CUDA device or the interpreter is on (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get('TRITON_INTERPRET') == '1':
        return True
    import torch
    return torch.cuda.is_available()


def supports(q, v, chunk_size=None) -> bool:
    """Whether the compiled kernels take these shapes and dtypes (the default backend falls back to torch if not)."""
    from .config import unsupported_reason
    return unsupported_reason(q, v, chunk_size) is None


def gka_chunk_triton(q, k, v, g, alpha, **kwargs):
    """See :func:`gka_kernels.triton.function.gka_chunk_triton`."""
    from .function import gka_chunk_triton as impl
    return impl(q, k, v, g, alpha, **kwargs)


def gka_step_triton(q, k, v, g, alpha, state=None, **kwargs):
    """See :func:`gka_kernels.triton.decode.gka_step_triton`."""
    from .decode import gka_step_triton as impl
    return impl(q, k, v, g, alpha, state, **kwargs)
