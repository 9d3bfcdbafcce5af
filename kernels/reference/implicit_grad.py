"""The implicit (adjoint-solve) gradient of gka_spec.md §5.2, evaluated token by token with dense D×D
matrices: the oracle for the chunked backward passes. Nothing here is shared with the chunked code."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..chebyshev import chebyshev_omegas, chebyshev_solve, safe_frobenius, step_size

__all__ = ['gka_naive_implicit_grads']


@torch.no_grad()
def gka_naive_implicit_grads(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        alpha: torch.Tensor,
        do: torch.Tensor,
        num_iter: int = 30,
        ridge_ratio: float = 0.02,
        scale: Optional[float] = None,
        initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        d_final_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Gradients of <o, do> (+ <final state, d_final_state>) w.r.t. q, k, v, g, alpha and the initial state,
    with the solve differentiated implicitly: x is treated as A⁻¹q and the adjoint u = A⁻¹(α·dq̃) is the same
    N-step Chebyshev solve with the forward's f. Computes in the dtype of q (use float64)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    r = float(ridge_ratio)
    s = Dk ** -0.5 if scale is None else scale
    dt = q.dtype
    g = g.to(dt)
    alpha = alpha.to(dt)
    omegas = chebyshev_omegas(num_iter, r)
    hkk = q.new_zeros(B, H, Dk, Dk) if initial_state is None else initial_state[0].to(dt).clone()
    hkv = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state[1].to(dt).clone()

    Hs, Us, xs, fs, lives, qts = [], [], [], [], [], []
    for t in range(T):
        gam = g[:, t].exp()[..., None, None]
        kt = k[:, t]
        hkk = gam * hkk + kt[..., :, None] * kt[..., None, :]
        hkv = gam * hkv + kt[..., :, None] * v[:, t][..., None, :]
        qt = q[:, t]
        if num_iter > 0:
            f, live = safe_frobenius(torch.linalg.matrix_norm(hkk))
            lam = (r * f)[..., None]
            hk = hkk
            x = chebyshev_solve(lambda y: (hk @ y[..., None])[..., 0] + lam * y, qt,
                                step_size(f, r)[..., None], omegas)
            qt = qt + alpha[:, t, :, None] * (x - qt)
        else:
            f = live = x = None
        Hs.append(hkk)
        Us.append(hkv)
        xs.append(x)
        fs.append(f)
        lives.append(live)
        qts.append(qt)

    S = q.new_zeros(B, H, Dk, Dk) if d_final_state is None else d_final_state[0].to(dt).clone()
    SU = q.new_zeros(B, H, Dk, Dv) if d_final_state is None else d_final_state[1].to(dt).clone()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dg, dalpha = torch.zeros_like(g), torch.zeros_like(alpha)
    for t in reversed(range(T)):
        if t < T - 1:
            gnext = g[:, t + 1].exp()[..., None, None]
            S = gnext * S
            SU = gnext * SU
        kt, vt, qt = k[:, t], v[:, t], q[:, t]
        dot = do[:, t].to(dt)
        Ht, Ut = Hs[t], Us[t]
        dqt = s * (Ut @ dot[..., None])[..., 0]            # ∂ℓ/∂q̃_t
        SU = SU + s * qts[t][..., :, None] * dot[..., None, :]
        if num_iter > 0:
            x, f, live = xs[t], fs[t], lives[t]
            dalpha[:, t] = (dqt * (x - qt)).sum(-1)
            gx = alpha[:, t, :, None] * dqt
            lam = (r * f)[..., None]
            u = chebyshev_solve(lambda y: (Ht @ y[..., None])[..., 0] + lam * y, gx,
                                step_size(f, r)[..., None], omegas)
            dq[:, t] = (1 - alpha[:, t, :, None]) * dqt + u
            c = torch.where(live, r * (u * x).sum(-1) / f, torch.zeros_like(f))[..., None, None]
            Gbar = -u[..., :, None] * x[..., None, :] - c * Ht
            S = S + Gbar
        else:
            dq[:, t] = dqt
        dk[:, t] = ((S + S.transpose(-1, -2)) @ kt[..., None])[..., 0] + (SU @ vt[..., None])[..., 0]
        dv[:, t] = (SU.transpose(-1, -2) @ kt[..., None])[..., 0]
        kk = kt[..., :, None] * kt[..., None, :]
        kv = kt[..., :, None] * vt[..., None, :]
        dg[:, t] = (S * (Ht - kk)).sum((-1, -2)) + (SU * (Ut - kv)).sum((-1, -2))
    g0 = g[:, 0].exp()[..., None, None] if T else 1.0
    return dict(q=dq, k=dk, v=dv, g=dg, alpha=dalpha, h_kk=g0 * S, h_kv=g0 * SU)
