"""Gradient through the Gram H_τ: the implicit-solve part of gka_spec.md §5.2–5.3, chunk by chunk.

With the adjoint u_τ = A_τ⁻¹(α_τ ∂ℓ/∂q̃_τ), the gradient w.r.t. H_τ is Ḡ_τ = −u_τx_τᵀ − c_τH_τ with
c_τ = r(u_τ·x_τ)/f_τ (the λ-path). Every key σ then gets dk_σ = (S_σ + S_σᵀ)k_σ, S_σ = Σ_{τ≥σ} decay·Ḡ_τ,
and the cumulative log-decay gets ∂ℓ/∂Γ_τ = ⟨Ḡ_τ, H_τ⟩ − k_τᵀS_τk_τ. No D×D matrix is formed per token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import Decay
from .solve import gram_matvec


class GramIntra(NamedTuple):
    dk: torch.Tensor          # the part of dk from the chunk's own tokens
    dgamma_part: torch.Tensor  # ⟨Ḡ_τ, H_τ⟩ per token
    increment: torch.Tensor   # Σ_τ e_τ Ḡ_τ: the chunk's own gradient w.r.t. its entry Gram


def gram_backward_intra(X: torch.Tensor, Ua: torch.Tensor, K: torch.Tensor, H0: torch.Tensor, d: Decay,
                        f: torch.Tensor, live: torch.Tensor, ridge_ratio: float) -> GramIntra:
    """X: solve outputs, Ua: adjoint solves, both [.., C, D]; f, live: the forward's norms [.., C]."""
    Kt = K.transpose(-1, -2)
    c = torch.where(live, ridge_ratio * (Ua * X).sum(-1) / f, torch.zeros_like(f))
    # (u_τ x_τᵀ + x_τ u_τᵀ) k_σ summed over τ ≥ σ with the decay M[τ, σ]
    rank1 = ((X @ Kt) * d.M).transpose(-1, -2) @ Ua + ((Ua @ Kt) * d.M).transpose(-1, -2) @ X
    # c_τ (H_τ + H_τᵀ) k_σ summed over τ ≥ σ, with H_τ expanded over the entry state and the chunk's keys
    W1 = (d.M.transpose(-1, -2) @ (c * d.e)[..., None])[..., 0]
    W2 = d.M.transpose(-1, -2) @ (c[..., None] * d.M)
    lam_path = W1[..., None] * (K @ (H0 + H0.transpose(-1, -2))) + 2 * (W2 * (K @ Kt)) @ K
    dk = -(rank1 + lam_path)
    dgamma_part = -(Ua * gram_matvec(X, K, H0, d)).sum(-1) - c * f.square()
    ce2 = (c * d.e.square()).sum(-1)[..., None, None]
    increment = -((d.e[..., None] * Ua).transpose(-1, -2) @ X) - ce2 * H0 - (W1[..., None] * K).transpose(-1, -2) @ K
    return GramIntra(dk, dgamma_part, increment)


def gram_backward_inter(K: torch.Tensor, R: torch.Tensor, d: Decay) -> torch.Tensor:
    """dk_σ from the gradient R w.r.t. the chunk's exit Gram (later chunks and the final state)."""
    return d.b[..., None] * (K @ (R + R.transpose(-1, -2)))
