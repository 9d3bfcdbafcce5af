"""The per-token ridge solve, for all chunks at once (gka_spec.md §4 step B).

Inside a chunk the Gram of token τ is H_τ = e_τ·H⁰ + Σ_{σ≤τ} M[τ,σ]·k_σ k_σᵀ, never formed: its Frobenius
norm comes from an exact expansion and its matvec from three matmuls."""
from __future__ import annotations

from typing import Tuple

import torch

from ..chebyshev import chebyshev_omegas, safe_frobenius, step_size
from .layout import Decay


def frobenius(K: torch.Tensor, H0: torch.Tensor, d: Decay) -> Tuple[torch.Tensor, torch.Tensor]:
    """f_τ = ‖H_τ‖_F for every row, floored (returns f and the not-floored mask).

    f² = e²‖H⁰‖² + 2e·Σ_σ M[τ,σ] k_σᵀH⁰k_σ + Σ_{σ,σ'} M[τ,σ] M[τ,σ'] (k_σ·k_σ')².
    """
    kHk = ((K @ H0) * K).sum(-1)
    P = (K @ K.transpose(-1, -2)).square()
    f2 = (d.e.square() * H0.square().sum((-1, -2))[..., None]
          + 2 * d.e * (d.M @ kHk[..., None])[..., 0]
          + ((d.M @ P) * d.M).sum(-1))
    return safe_frobenius(f2.clamp_min(0).sqrt())


def gram_matvec(X: torch.Tensor, K: torch.Tensor, H0: torch.Tensor, d: Decay) -> torch.Tensor:
    """Rows of H_τ x_τ for X [.., C, D]. X·H⁰ᵀ gives the rows of H⁰x; a Gram from this operator is symmetric, but
    an initial state perturbed entry by entry (gradcheck) is not, and the gradient must match H⁰x."""
    return d.e[..., None] * (X @ H0.transpose(-1, -2)) + ((X @ K.transpose(-1, -2)) * d.M) @ K


def chunk_solve(
        rhs: torch.Tensor,
        K: torch.Tensor,
        H0: torch.Tensor,
        d: Decay,
        f: torch.Tensor,
        num_iter: int,
        ridge_ratio: float,
) -> torch.Tensor:
    """N Chebyshev steps for (H_τ + λ_τ I) x_τ = rhs_τ, every row of every chunk at once (the steps of
    ``chebyshev.chebyshev_solve`` with the matvec of ``gram_matvec``).

    The two products with the iterate on the left share one matmul against [H⁰ᵀ | Kᵀ], and the constant operands
    are made contiguous once: a strided batched operand is copied by every matmul, which took a third of the CPU
    time of the solve. The update runs in place on fresh tensors (no autograd records this loop: the backward is
    the implicit one)."""
    omegas = chebyshev_omegas(num_iter, float(ridge_ratio))
    eta = step_size(f, ridge_ratio)[..., None]
    x = eta * rhs
    if not omegas:
        return x
    D = H0.shape[-1]
    W = torch.cat((H0.transpose(-1, -2), K.transpose(-1, -2)), dim=-1).contiguous()   # [.., D, D + C]
    Kc, M = K.contiguous(), d.M.contiguous()
    e = d.e[..., None]
    lam = (ridge_ratio * f)[..., None]
    x_prev = torch.zeros_like(x)
    for omega in omegas:
        P = x @ W
        res = (P[..., D:] * M) @ Kc                                 # Σ_σ M[τ,σ] (k_σ·x_τ) k_σ
        res.addcmul_(e, P[..., :D]).addcmul_(lam, x).sub_(rhs)    # (H_τ + λ_τ I) x_τ − rhs_τ
        x_new = torch.addcmul(x, eta, res, value=-1.0).mul_(omega).add_(x_prev, alpha=1.0 - omega)
        x_prev, x = x, x_new
    return x
