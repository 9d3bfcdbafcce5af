"""Inter-chunk state passes: the forward recurrence of chunk-entry states, and the reverse recurrence of the
gradient w.r.t. chunk-exit states. Both are serial over chunks only; the per-chunk increments are batched."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def forward_states(
        increments: torch.Tensor,
        last: torch.Tensor,
        initial: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """S_0 = initial, S_{c+1} = last_c·S_c + increments_c.

    Args:
        increments: [B, H, NC, Dr, Dc], each chunk's own decayed contribution to its exit state.
        last: [B, H, NC], the decay across each chunk.
        initial: [B, H, Dr, Dc] or None (zeros).

    Returns:
        the entry state of every chunk [B, H, NC, Dr, Dc] and the exit state of the last one.
    """
    cur = torch.zeros_like(increments[:, :, 0]) if initial is None else initial.to(increments.dtype)
    entries = []
    for c in range(increments.shape[2]):
        entries.append(cur)
        cur = last[:, :, c, None, None] * cur + increments[:, :, c]
    return torch.stack(entries, dim=2), cur


def reverse_states(
        increments: torch.Tensor,
        last: torch.Tensor,
        final: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradient w.r.t. each chunk's exit state, from everything after it.

    R_{NC-1} = final (the gradient of the returned final state, or 0), R_{c-1} = last_c·R_c + increments_c,
    where increments_c is the gradient w.r.t. chunk c's entry state that chunk c's own tokens produce.

    Returns:
        R_c for every chunk [B, H, NC, Dr, Dc] and the gradient w.r.t. the initial state (R_{-1}).
    """
    cur = torch.zeros_like(increments[:, :, 0]) if final is None else final.to(increments.dtype)
    exits = [None] * increments.shape[2]
    for c in reversed(range(increments.shape[2])):
        exits[c] = cur
        cur = last[:, :, c, None, None] * cur + increments[:, :, c]
    return torch.stack(exits, dim=2), cur
