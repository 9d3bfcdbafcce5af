"""The fixed-coefficient Chebyshev solve shared by every backend (gka_spec.md §3.3-3.4).

The eigenvalues of A_t = H_t + λ_t I lie in [λ_t, λ_t + f_t] with λ_t = r·f_t, so the contraction factor
ρ = 1/(1 + 2r) and the ω sequence do not depend on the token: one list of scalars serves every token, head
and batch element, and only the step η_t = 2 / ((1 + 2r)·f_t) varies.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Tuple

import torch

__all__ = ['F_MIN', 'chebyshev_omegas', 'chebyshev_solve', 'error_gains', 'safe_frobenius', 'step_size']

# Floor on the Frobenius norm f_t. A zero Gram (all keys zero so far) would make η = 2/((1+2r)·f) infinite;
# with the floor the iterate stays finite (≤ |q|/(r·F_MIN)) and, since the KV state is then zero too, the
# output is exactly zero. Keys from the mixer have ‖k‖ ≥ 1e-6 (β + 1e-6), i.e. f ≥ 1e-12 at the first token,
# so the floor only ever touches an exactly-zero or padded Gram in practice.
F_MIN = 1e-10


@lru_cache(maxsize=64)
def chebyshev_omegas(num_iter: int, ridge_ratio: float) -> Tuple[float, ...]:
    """ω_1..ω_N of the semi-iterative Chebyshev method, seeded with ω = 2 and updated before each step."""
    rho = 1.0 / (1.0 + 2.0 * ridge_ratio)
    c = rho * rho / 4.0
    omega = 2.0
    out = []
    for _ in range(num_iter):
        omega = 1.0 / (1.0 - c * omega)
        out.append(omega)
    return tuple(out)


@lru_cache(maxsize=64)
def error_gains(num_iter: int, ridge_ratio: float, grid: int = 1025) -> Tuple[float, ...]:
    """γ_k, k = 0..N-1: the most the steps after step k can scale an error that step k leaves in the iterate.

    The iteration is linear in the error, so a perturbation δ of x_{k+1} reaches x_N as p_k(A)·δ, where p_k follows
    the same three-term recurrence (e_{i+1} = ω_i (1 - η μ) e_i + (1 - ω_i) e_{i-1}, e_{k+1} = 1, e_k = 0) at each
    eigenvalue μ of A; with η = 2 / ((1 + 2r) f) the spectrum [r f, (1 + r) f] maps to one interval for every token,
    so γ_k = max |p_k| over it needs no data. Rounding made early is damped (γ_k ≪ 1 when many steps follow and r is
    not small), which is what lets the leading steps use cheaper products (kernels/triton/solve.py)."""
    omegas = chebyshev_omegas(num_iter, ridge_ratio)
    r = float(ridge_ratio)
    mu = torch.linspace(r, 1.0 + r, grid, dtype=torch.float64)   # eigenvalues in units of f
    damp = 1.0 - 2.0 / (1.0 + 2.0 * r) * mu
    # row k carries the perturbation made in step k; it starts propagating at step k + 1
    e = torch.ones(num_iter, grid, dtype=torch.float64)
    e_prev = torch.zeros_like(e)
    for i in range(1, num_iter):
        live = torch.arange(num_iter) < i
        e_new = torch.where(live[:, None], omegas[i] * damp * e + (1.0 - omegas[i]) * e_prev, e)
        e_prev = torch.where(live[:, None], e, e_prev)
        e = e_new
    return tuple(e.abs().amax(1).tolist())


def safe_frobenius(f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Floor f at F_MIN. Returns the floored norm and a mask of the tokens whose norm was not floored
    (only those carry the λ-path gradient: the floor is flat)."""
    live = f > F_MIN
    return torch.where(live, f, torch.full_like(f, F_MIN)), live


def step_size(f: torch.Tensor, ridge_ratio: float) -> torch.Tensor:
    """η_t = 2 / (λ_t + f_t + λ_t) = 2 / ((1 + 2r)·f_t)."""
    return 2.0 / ((1.0 + 2.0 * ridge_ratio) * f)


def chebyshev_solve(
        matvec: Callable[[torch.Tensor], torch.Tensor],
        rhs: torch.Tensor,
        eta: torch.Tensor,
        omegas: Tuple[float, ...],
) -> torch.Tensor:
    """N Chebyshev steps for A x = rhs from x_0 = 0 (x_1 = η·rhs needs no matvec).

    Args:
        matvec: applies A (already including λ·I) to a tensor shaped like ``rhs``.
        rhs: right-hand sides, vectors along the last dim.
        eta: per-vector step, broadcastable against ``rhs`` (trailing singleton dim).
        omegas: ``chebyshev_omegas(N, r)``; N = len(omegas) matvecs are made.
    """
    x_prev = torch.zeros_like(rhs)
    x = eta * rhs
    for omega in omegas:
        x_new = omega * (x - eta * (matvec(x) - rhs)) + (1.0 - omega) * x_prev
        x_prev, x = x, x_new
    return x
