"""Random GKA operator inputs shaped like the mixer's (L2-normalised q/k, β-scaled k/v, log-decay ≤ 0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(B, T, H, D, dtype=torch.float64, device='cpu', Dv=None, decay=0.3, requires_grad=False):
    Dv = D if Dv is None else Dv
    kw = dict(dtype=torch.float64, device=device)
    q = F.normalize(torch.randn(B, T, H, D, **kw), dim=-1)
    beta = torch.rand(B, T, H, 1, **kw) * 0.9 + 0.1
    k = F.normalize(torch.randn(B, T, H, D, **kw), dim=-1) * beta
    v = torch.randn(B, T, H, Dv, **kw) * beta
    g = -torch.rand(B, T, H, **kw) * decay
    alpha = torch.rand(B, T, H, **kw)
    out = [q.to(dtype), k.to(dtype), v.to(dtype), g.to(torch.float64 if dtype == torch.float64 else torch.float32),
           alpha.to(dtype)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
