"""Triton-backend options and the checks that only this backend needs (the public entry validated the rest)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..validation import GKAInputError

__all__ = ['HEAD_DIMS', 'CHUNK_SIZES', 'check_triton_inputs', 'pick_chunk_size', 'solve_dot_mode', 'F_MIN']

from ..chebyshev import F_MIN  # noqa: E402  (the same floor as every other backend)

HEAD_DIMS = (32, 64, 128)
CHUNK_SIZES = (16, 32, 64)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_triton_inputs(q: torch.Tensor, v: torch.Tensor, chunk_size: Optional[int] = None):
    """Head dims, dtypes and chunk sizes that the kernels are compiled for."""
    if q.shape[-1] not in HEAD_DIMS:
        raise GKAInputError(f'backend "triton" supports q/k head dims {HEAD_DIMS}, got {q.shape[-1]}; '
                            'use backend="torch" for other sizes')
    if v.shape[-1] not in HEAD_DIMS:
        raise GKAInputError(f'backend "triton" supports v head dims {HEAD_DIMS}, got {v.shape[-1]}; '
                            'use backend="torch" for other sizes')
    if q.dtype not in _DTYPES:
        raise GKAInputError(f'backend "triton" takes float16, bfloat16 or float32 q/k/v, got {q.dtype}; '
                            'use backend="torch" or "naive" for float64')
    if chunk_size is not None and chunk_size not in CHUNK_SIZES:
        raise GKAInputError(f'backend "triton" supports chunk_size in {CHUNK_SIZES} (or None), got {chunk_size}')


def pick_chunk_size(chunk_size: Optional[int], head_dim: int) -> int:
    """Default tiling: 32-token chunks. The intra-chunk term of an iteration is 4CD FLOPs against 2D² for the
    entry state, and at D = 128 a 64-row fp32 iterate pair no longer fits the register file well.
    ``GKA_TRITON_CHUNK`` overrides the default (benchmarks)."""
    if chunk_size is not None:
        return chunk_size
    env = os.environ.get('GKA_TRITON_CHUNK')
    if env:
        c = int(env)
        if c not in CHUNK_SIZES:
            raise GKAInputError(f'GKA_TRITON_CHUNK must be one of {CHUNK_SIZES}, got {env!r}')
        return c
    return 32


def solve_dot_mode(dtype: torch.dtype) -> str:
    """Operand precision of the tensor-core dots inside the Chebyshev loop.

    'ieee': fp32 operands, exact fp32 products (fp32 inputs: the tight path).
    'tf32': fp32 operands rounded to tf32 (10-bit mantissa) by the tensor cores (default for 16-bit inputs).
    'lowp': operands cast to the input's 16-bit dtype (the reference kernels' choice), fp32 accumulation.
    ``GKA_TRITON_DOT`` overrides the choice for 16-bit inputs (benchmarks)."""
    if dtype == torch.float32:
        return 'ieee'
    mode = os.environ.get('GKA_TRITON_DOT', 'tf32')
    if mode not in ('ieee', 'tf32', 'lowp'):
        raise GKAInputError(f'GKA_TRITON_DOT must be ieee, tf32 or lowp, got {mode!r}')
    return mode
