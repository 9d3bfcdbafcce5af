"""Chunk layout: [B, T, H, ...] ↔ [B, H, NC, C, ...], and the per-chunk decay factors."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *rest] → [B, H, NC, C, *rest], zero-padding T up to a multiple of C.

    Padded tokens come after the real ones, so with zero k, v, q and a zero log-decay they change neither the
    outputs of real tokens nor the final state."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    pad = (-T) % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))
    nc = (T + pad) // chunk_size
    x = x.reshape(B, nc, chunk_size, H, *rest)
    return x.permute(0, 3, 1, 2, *range(4, 4 + len(rest)))


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, NC, C, *rest] → [B, T, H, *rest] (dropping the padding)."""
    B, H, nc, C = x.shape[:4]
    rest = x.shape[4:]
    x = x.permute(0, 2, 3, 1, *range(4, 4 + len(rest))).reshape(B, nc * C, H, *rest)
    return x[:, :T]


class Decay(NamedTuple):
    """Decay factors of one chunk, from the chunk-local inclusive cumsum gc of the log-decays.

    e[τ] = exp(gc_τ): from the chunk's entry state to token τ.
    b[σ] = exp(gc_last − gc_σ): from token σ to the chunk's end.
    last = exp(gc_last): across the whole chunk.
    M[τ, σ] = exp(gc_τ − gc_σ) for σ ≤ τ, else 0: the causal intra-chunk decay.
    """
    e: torch.Tensor
    b: torch.Tensor
    last: torch.Tensor
    M: torch.Tensor


def chunk_decay(g: torch.Tensor) -> Decay:
    """g: [B, H, NC, C] log-decays (≤ 0) in the compute dtype."""
    gc = g.cumsum(-1)
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    diff = gc[..., :, None] - gc[..., None, :]
    # Exponentiate only non-positive differences: the upper triangle can be large and positive.
    M = torch.where(causal, diff, torch.full_like(diff, float('-inf'))).exp()
    gl = gc[..., -1:]
    return Decay(e=gc.exp(), b=(gl - gc).exp(), last=gl[..., 0].exp(), M=M)
