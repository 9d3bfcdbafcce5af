"""Building blocks shared by the vision mixer and the language model (gka_spec.md §2)."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['GatedRMSNorm', 'l2_normalize', 'init_forget_gate', 'forget_gate_log_decay', 'autocast_fanout', 'BETA_EPS',
           'L2_EPS']

# Added to β before it scales k and v, so a closed gate still leaves a (tiny) key and the Gram stays non-zero.
BETA_EPS = 1e-6
# Added to ‖q‖ and ‖k‖ before dividing (gka_spec.md §2 step 4).
L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / (‖x‖₂ + eps) over the last dim: eps added to the norm, not clamped (gka_spec.md §2 step 4)."""
    return x / (torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True) + eps).to(x.dtype)


def init_forget_gate(
        a_log: torch.Tensor,
        dt_bias: torch.Tensor,
        a_range: tuple = (0.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
) -> None:
    """In-place init of the forget gate a = −exp(A_log)·softplus(x·W_a + dt_bias):
    A_log = log U(a_range), dt_bias = softplus⁻¹(dt) with dt = exp(U(log dt_min, log dt_max)) ≥ dt_floor."""
    with torch.no_grad():
        a = torch.empty_like(a_log, dtype=torch.float32).uniform_(*a_range).clamp_min(1e-4)
        a_log.copy_(a.log())
        dt = torch.exp(torch.empty_like(dt_bias, dtype=torch.float32).uniform_(math.log(dt_min), math.log(dt_max)))
        dt = dt.clamp_min(dt_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt) = dt + log(1 − e^{−dt})


def forget_gate_log_decay(x_proj: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """a = −exp(A_log)·softplus(x·W_a + dt_bias), computed in fp32 (it is summed over the sequence); a ≤ 0."""
    return -a_log.float().exp() * F.softplus(x_proj.float() + dt_bias.float())


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim times SiLU of a gate: o ← RMSNorm(o)·w ⊙ SiLU(z) (fla FusedRMSNormGated)."""

    def __init__(
            self,
            dim: int,
            eps: float = 1e-6,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # fp32 statistics; F.rms_norm is one fused kernel on CUDA where torch has it
        xf = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return (xf * F.silu(gate.float())).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class _CastFanout(torch.autograd.Function):
    """x cast once, handed out as n views of the one cast tensor; the consumers' gradients are cast back and summed
    in x's dtype, as autocast's separate per-op casts would have them."""

    @staticmethod
    def forward(ctx, x, dtype, n: int):
        ctx.in_dtype = x.dtype
        xc = x.to(dtype)
        return tuple(xc.view_as(xc) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                g = g.to(ctx.in_dtype)
                total = g if total is None else total + g
        return total, None, None


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device type, False where autocast has no state at all (meta). cuda and cpu
    are asked directly: dynamo (torch 2.11) cannot trace torch.amp.is_autocast_available."""
    if device_type in ('cuda', 'cpu') or torch.amp.is_autocast_available(device_type):
        return torch.is_autocast_enabled(device_type)
    return False


def autocast_fanout(x: torch.Tensor, n: int):
    """x for n layers that autocast would each cast to its low-precision dtype: autocast caches only the casts of
    parameters, so every Linear would cast (and, in training, save) its own copy of an activation. Here it is cast
    once, and with autograd the input gradient still sums in x's dtype. Outside autocast, or for an x autocast would
    not cast, x itself n times. ``GKA_CAST_FANOUT=0`` leaves the casts to autocast (benchmarks)."""
    dev = x.device.type
    if os.environ.get('GKA_CAST_FANOUT') == '0':   # benchmarks: autocast's own per-Linear casts
        return (x,) * n
    # autocast leaves float64 alone
    if not autocast_enabled(dev) \
            or x.dtype in (torch.get_autocast_dtype(dev), torch.float64) or not x.is_floating_point():
        return (x,) * n
    dtype = torch.get_autocast_dtype(dev)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return (x.to(dtype),) * n
    return _CastFanout.apply(x, dtype, n)
