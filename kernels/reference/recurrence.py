"""gka_spec.md §3 to the letter, one token at a time. Differentiable by plain autograd (through the unrolled
iterations, or through ``torch.linalg.solve`` when ``exact_solve=True``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..chebyshev import chebyshev_omegas, chebyshev_solve, safe_frobenius, step_size

__all__ = ['gka_naive', 'recurrent_step']

State = Tuple[torch.Tensor, torch.Tensor]


def recurrent_step(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        alpha: torch.Tensor,
        state: State,
        num_iter: int,
        ridge_ratio: float,
        scale: float,
        exact_solve: bool = False,
) -> Tuple[torch.Tensor, State]:
    """One token for every (batch, head): q, k [B, H, Dk], v [B, H, Dv], g, alpha [B, H], all in the state dtype.

    Returns o [B, H, Dv] and the new (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]); both states include this token.
    """
    h_kk, h_kv = state
    gamma = g.exp()[..., None, None]
    h_kk = gamma * h_kk + k[..., :, None] * k[..., None, :]
    h_kv = gamma * h_kv + k[..., :, None] * v[..., None, :]
    if num_iter > 0:
        f, _ = safe_frobenius(torch.linalg.matrix_norm(h_kk))
        lam = (ridge_ratio * f)[..., None]
        if exact_solve:
            eye = torch.eye(h_kk.shape[-1], dtype=h_kk.dtype, device=h_kk.device)
            x = torch.linalg.solve(h_kk + lam[..., None] * eye, q)
        else:
            hk = h_kk

            def matvec(x):
                return (hk @ x[..., None])[..., 0] + lam * x

            x = chebyshev_solve(matvec, q, step_size(f, ridge_ratio)[..., None],
                                chebyshev_omegas(num_iter, float(ridge_ratio)))
        q = q + alpha[..., None] * (x - q)
    o = scale * (h_kv.transpose(-1, -2) @ q[..., None])[..., 0]
    return o, (h_kk, h_kv)


def gka_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        alpha: torch.Tensor,
        num_iter: int = 30,
        ridge_ratio: float = 0.02,
        scale: Optional[float] = None,
        initial_state: Optional[State] = None,
        output_final_state: bool = False,
        exact_solve: bool = False,
):
    """The recurrence of gka_spec.md §3 over [B, T, H, D] inputs. Computes in fp64 for fp64 inputs, else fp32."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = Dk ** -0.5 if scale is None else scale
    if initial_state is None:
        state = (q.new_zeros(B, H, Dk, Dk, dtype=cdt), q.new_zeros(B, H, Dk, Dv, dtype=cdt))
    else:
        state = (initial_state[0].to(cdt), initial_state[1].to(cdt))
    qc, kc, vc, gc, ac = (t.to(cdt) for t in (q, k, v, g, alpha))
    outs = []
    for t in range(T):
        o, state = recurrent_step(qc[:, t], kc[:, t], vc[:, t], gc[:, t], ac[:, t], state,
                                  num_iter, ridge_ratio, scale, exact_solve)
        outs.append(o)
    o = torch.stack(outs, dim=1).to(q.dtype) if T else q.new_zeros(B, 0, H, Dv)
    return (o, state) if output_final_state else o
