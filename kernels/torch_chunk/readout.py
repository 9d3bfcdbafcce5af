"""Gated linear-attention readout o_τ = s·U_τᵀ q̃_τ over chunks, and its gradient (gka_spec.md §3.5)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import Decay


def readout_forward(Qt: torch.Tensor, K: torch.Tensor, V: torch.Tensor, U0: torch.Tensor, d: Decay,
                    scale: float) -> torch.Tensor:
    """Qt, K [.., C, Dk], V [.., C, Dv], U0 [.., Dk, Dv] (chunk-entry KV state) → O [.., C, Dv]."""
    return scale * (d.e[..., None] * (Qt @ U0) + ((Qt @ K.transpose(-1, -2)) * d.M) @ V)


class ReadoutGrads(NamedTuple):
    dqt: torch.Tensor   # ∂ℓ/∂q̃
    dk: torch.Tensor
    dv: torch.Tensor
    dgamma: torch.Tensor  # ∂ℓ/∂Γ_τ (global cumulative log-decay), per token


def readout_backward(dO: torch.Tensor, Qt: torch.Tensor, K: torch.Tensor, V: torch.Tensor, U0: torch.Tensor,
                     R: torch.Tensor, d: Decay, scale: float) -> ReadoutGrads:
    """R [.., Dk, Dv]: gradient w.r.t. each chunk's exit KV state from later tokens and the final state.

    The log-decay enters only through differences Γ_τ − Γ_σ, so ∂ℓ/∂Γ_τ = q̃_τ·∂q̃_τ − k_τ·∂k_τ.
    """
    A = (dO @ V.transpose(-1, -2)) * d.M           # A[τ,σ] = M[τ,σ] (do_τ·v_σ)
    dqt = scale * (d.e[..., None] * (dO @ U0.transpose(-1, -2)) + A @ K)
    dk = scale * (A.transpose(-1, -2) @ Qt) + d.b[..., None] * (V @ R.transpose(-1, -2))
    Bm = (Qt @ K.transpose(-1, -2)) * d.M           # B[τ,σ] = M[τ,σ] (q̃_τ·k_σ)
    dv = scale * (Bm.transpose(-1, -2) @ dO) + d.b[..., None] * (K @ R)
    dgamma = (Qt * dqt).sum(-1) - (K * dk).sum(-1)
    return ReadoutGrads(dqt, dk, dv, dgamma)


def readout_state_grad_increment(dO: torch.Tensor, Qt: torch.Tensor, d: Decay, scale: float) -> torch.Tensor:
    """Each chunk's own contribution to the gradient w.r.t. its entry KV state: s·Σ_τ e_τ q̃_τ do_τᵀ."""
    return scale * (d.e[..., None] * Qt).transpose(-1, -2) @ dO
