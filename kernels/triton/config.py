"""Triton-backend options and the checks that only this backend needs (the public entry validated the rest)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..chebyshev import F_MIN  # the same floor on ‖H‖_F as every other backend
from ..validation import GKAInputError

__all__ = [
    'HEAD_DIMS', 'CHUNK_SIZES', 'check_triton_inputs', 'unsupported_reason', 'pick_chunk_size', 'backward_chunk_size',
    'backward_state_chunk',
    'segment_length', 'forward_pieces', 'solve_dot_mode', 'F_MIN',
]

HEAD_DIMS = (32, 64, 128)
CHUNK_SIZES = (16, 32, 64)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, chunk_size: Optional[int] = None) -> Optional[str]:
    """Why the kernels cannot take these inputs (head dims, dtypes, chunk sizes they are compiled for), or None."""
    if q.shape[-1] not in HEAD_DIMS:
        return (f'backend "triton" supports q/k head dims {HEAD_DIMS}, got {q.shape[-1]}; '
                'use backend="torch" for other sizes')
    if v.shape[-1] not in HEAD_DIMS:
        return (f'backend "triton" supports v head dims {HEAD_DIMS}, got {v.shape[-1]}; '
                'use backend="torch" for other sizes')
    if q.dtype not in _DTYPES:
        return (f'backend "triton" takes float16, bfloat16 or float32 q/k/v, got {q.dtype}; '
                'use backend="torch" or "naive" for float64')
    if chunk_size is not None and chunk_size not in CHUNK_SIZES:
        return f'backend "triton" supports chunk_size in {CHUNK_SIZES} (or None), got {chunk_size}'
    if chunk_size == 64 and max(q.shape[-1], v.shape[-1]) == 128:
        # the per-chunk kernel's tiles exceed the H200's shared memory (240 KB needed, 227 KB available)
        return 'backend "triton" supports chunk_size 16 or 32 (or None) at head dim 128, got 64'
    return None


def check_triton_inputs(q: torch.Tensor, v: torch.Tensor, chunk_size: Optional[int] = None):
    reason = unsupported_reason(q, v, chunk_size)
    if reason is not None:
        raise GKAInputError(reason)


def _env_chunk(name: str) -> Optional[int]:
    """A chunk size set through the environment variable ``name`` (benchmarks), checked; None when unset."""
    env = os.environ.get(name)
    if not env:
        return None
    c = int(env)
    if c not in CHUNK_SIZES:
        raise GKAInputError(f'{name} must be one of {CHUNK_SIZES}, got {env!r}')
    return c


def pick_chunk_size(chunk_size: Optional[int], head_dim: int, seq_len: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> int:
    """Default tiling. bf16 at D = 64 takes 64-token chunks once a sequence is longer than 32 tokens: 64-row tiles
    put the solve loop on Hopper's wgmma (32-row tiles stay on mma.sync), measured 16 % faster forward at
    B16 T4096 and 3 % faster fwd+bwd at B256 T196 on the H200 (KERNEL_NOTES.md, v6), with the same errors; it also
    halves the chunk states. Everything else keeps 32: at D = 128 a 64-row fp32 iterate pair spills (C = 64 was
    33 % slower), fp16/fp32 run tf32 products with twice the operand registers, and at D = 32 the intra-chunk term
    (4CD per step) already outweighs the entry state's 2D². ``GKA_TRITON_CHUNK`` overrides the default."""
    if chunk_size is not None:
        return chunk_size
    env = _env_chunk('GKA_TRITON_CHUNK')
    if env:
        return env
    if head_dim == 64 and dtype == torch.bfloat16 and (seq_len is None or seq_len > 32):
        return 64
    return 32


def backward_chunk_size(forward_chunk: int) -> int:
    """Chunk of the fused backward (head dims ≤ 64). It recomputes its chunk states, so its tiling is free of the
    forward's: 16-token chunks keep the fused kernel's ~10 live tiles in registers, which made the whole
    backward 1.5× faster than at 32 on the H200 (KERNEL_NOTES.md, v4). ``GKA_TRITON_BWD_CHUNK`` overrides."""
    return _env_chunk('GKA_TRITON_BWD_CHUNK') or min(forward_chunk, 16)


def backward_state_chunk(forward_chunk: int) -> int:
    """Chunk of the fused backward's recomputed states (at least its own chunk, ``backward_chunk_size``): each
    16-token program carries the states over the sub-chunks between a state-chunk boundary and its own instead of
    reading three fp32 D×D states recomputed per 16 tokens (KERNEL_NOTES.md, v15). 32 trades a little time for
    memory; measured in one interleaved A/B on the H200 against 16 / 64: gka_small's training peak at 1024 px
    10.43 GiB against 10.99 / 10.25 at the same step time (1.00× / 0.99×), at 224 px 8.14 against 8.57 / 7.98 GiB
    at 1.013× / 0.988× the time of 16. ``GKA_TRITON_BWD_STATE_CHUNK`` overrides (16: a state per backward chunk)."""
    return _env_chunk('GKA_TRITON_BWD_STATE_CHUNK') or min(forward_chunk, 32)


def segment_length(B: int, H: int, D: int, DV: int, T: int, chunk: int) -> int:
    """Tokens per forward segment. The forward materialises the fp32 entry states of every chunk (D·(D + DV)
    floats per chunk and head: 4× the bytes of q, k, v together at D = 64, C = 32), so a long sequence runs in
    segments that chain their final states, each holding at most ~64 MB of states but never fewer than 4,096
    (chunk, head) programs per launch. Segments end on chunk boundaries, so the result is the same bit for bit.
    The 64 MB cap (256 before) cut gka_small's inference peak at 1024 px from 1.00 to 0.88 GiB at 1 % of its
    throughput on the H200; lower caps change nothing there, the program floor decides (KERNEL_NOTES.md, v10).
    ``GKA_TRITON_SEGMENT`` sets the length in tokens (rounded up to whole chunks; 0 = never segment);
    ``GKA_TRITON_STATE_MB`` the cap in MB and ``GKA_TRITON_MIN_PROGRAMS`` the floor (benchmarks: a lower floor cuts
    the states of gka_small at 1024 px further, at an untimed cost in launches)."""
    env = os.environ.get('GKA_TRITON_SEGMENT')
    if env is not None:
        n = int(env)
        return T if n <= 0 else -(-n // chunk) * chunk
    cap_mb = int(os.environ.get('GKA_TRITON_STATE_MB', '64'))
    if cap_mb <= 0:
        raise GKAInputError(f'GKA_TRITON_STATE_MB must be a positive number of MB, got {cap_mb}')
    floor = int(os.environ.get('GKA_TRITON_MIN_PROGRAMS', '4096'))
    if floor <= 0:
        raise GKAInputError(f'GKA_TRITON_MIN_PROGRAMS must be a positive number of programs, got {floor}')
    per_chunk = B * H * D * (D + DV) * 4
    chunks = max((cap_mb << 20) // per_chunk, -(-floor // (B * H)), 1)
    return chunks * chunk


def forward_pieces(T: int, segment: int, chunk: int):
    """The forward's launches as (start, end, chunk size), chained through their final states.

    Segments of ``segment`` tokens at the chosen chunk size, then a ragged last chunk as its own launch at the
    smallest chunk size that holds it, so T = 196 at C = 64 computes 192 + 16 padded tokens instead of 256 (the
    solve's cost is per padded token): forward 1.79 vs 2.02 ms at B256 T196 H6 D64 on the H200
    (benchmarks/KERNEL_NOTES.md, v8). ``GKA_TRITON_TAIL=0`` pads the last chunk instead (benchmarks)."""
    body = T
    tail_chunk = None
    if os.environ.get('GKA_TRITON_TAIL', '1') != '0' and T > chunk and T % chunk:
        tail_chunk = min(c for c in CHUNK_SIZES if c >= T % chunk)
        if tail_chunk < chunk:
            body = T - T % chunk
        else:
            tail_chunk = None
    pieces = [(s, min(body, s + segment), chunk) for s in range(0, body, segment)]
    if tail_chunk is not None:
        pieces.append((body, T, tail_chunk))
    return pieces


def solve_dot_mode(dtype: torch.dtype, head_dim: int = 64) -> str:
    """Operand precision of the tensor-core dots inside the Chebyshev loop.

    The solve amplifies matvec rounding by up to κ ≤ 1 + 1/r = 51, so 16-bit or tf32 operands cost accuracy:
    on the H200 the output error vs float64 was 4e-2 with bf16 operands and 6e-3 with tf32 (bf16 inputs, N = 30;
    benchmarks/KERNEL_NOTES.md), against a 2e-3 target.

    'ieee': fp32 operands, exact fp32 products (fp32 inputs: the tight path).
    'bf16x3': the iterate (and H⁰) split into bf16 hi + lo, three bf16 dots where both sides are inexact and
        two where the keys are exact in bf16: ~16 mantissa bits at bf16 tensor-core speed (bf16 inputs; fp16
        inputs fall back to tf32x3, see solve.dot_mode).
    'tf32x3': three tf32 dots per product (fp32-like accuracy).
    'tf32': fp32 operands rounded to tf32 (10-bit mantissa).
    'lowp': operands cast to the input's 16-bit dtype (the reference kernels' choice), fp32 accumulation.
    'h16x2': 'bf16x3' with the H⁰ product as two fp16 MMAs on rescaled rows (solve.dot_mode). The default for bf16
        inputs at D = 64: in one interleaved A/B on the H200 (benchmarks/ab.py, session 6) its forward took 0.93-0.95×
        the time of 'bf16x3' at B256 T196 and B16 T4096 and gka_small's inference 0.95-0.96× (training 0.995-0.999×);
        at D = 128 it was 1.02× (so not there), at D = 32 it is untimed.
    ``GKA_TRITON_DOT`` overrides the choice for 16-bit inputs (benchmarks)."""
    if dtype == torch.float32:
        return 'ieee'
    default = 'h16x2' if dtype == torch.bfloat16 and head_dim == 64 else 'bf16x3'
    mode = os.environ.get('GKA_TRITON_DOT', default)
    if mode not in ('ieee', 'tf32', 'tf32x3', 'bf16x3', 'lowp', 'h16x2'):
        raise GKAInputError(f'GKA_TRITON_DOT must be ieee, tf32, tf32x3, bf16x3, lowp or h16x2, got {mode!r}')
    return mode
