"""One-token decoding on any device: the reference step in the state dtype (O(1) in the sequence length)."""
from __future__ import annotations

from ..reference.recurrence import recurrent_step
from ..validation import state_dtype


def gka_step_torch(q, k, v, g, alpha, state, num_iter, ridge_ratio, scale):
    cdt = state_dtype(q.dtype)
    B, H, Dk = q.shape
    if state is None:
        state = (q.new_zeros(B, H, Dk, Dk, dtype=cdt), q.new_zeros(B, H, Dk, v.shape[-1], dtype=cdt))
    else:
        state = (state[0].to(cdt), state[1].to(cdt))
    o, state = recurrent_step(*(t.to(cdt) for t in (q, k, v, g, alpha)), state, num_iter, ridge_ratio, scale)
    return o.to(q.dtype), state
