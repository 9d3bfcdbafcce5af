"""One-token decoding (gka_spec.md §6): one program per (sequence, head), everything in fp32, O(1) in the
sequence length. The D×D Gram and the D×Dv KV state are read once and written once."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .solve import _omegas
from .config import F_MIN


@triton.jit
def _step_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, al_ptr, hkk_ptr, hkv_ptr, hkk_out, hkv_out, o_ptr, om_ptr,
        H, r, scale, f_min,
        s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_gb, s_gh, s_ab, s_ah,
        D: tl.constexpr, DV: tl.constexpr, N: tl.constexpr, HAS_STATE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rd = tl.arange(0, D)
    rv = tl.arange(0, DV)
    kv = tl.load(k_ptr + b * s_kb + h * s_kh + rd).to(tl.float32)
    qv = tl.load(q_ptr + b * s_qb + h * s_qh + rd).to(tl.float32)
    vv = tl.load(v_ptr + b * s_vb + h * s_vh + rv).to(tl.float32)
    gam = tl.exp(tl.load(g_ptr + b * s_gb + h * s_gh).to(tl.float32))
    kk_tile = rd[:, None] * D + rd[None, :]
    kv_tile = rd[:, None] * DV + rv[None, :]
    if HAS_STATE:
        Hk = tl.load(hkk_ptr + bh * D * D + kk_tile)
        U = tl.load(hkv_ptr + bh * D * DV + kv_tile)
    else:
        Hk = tl.zeros([D, D], dtype=tl.float32)
        U = tl.zeros([D, DV], dtype=tl.float32)
    Hk = gam * Hk + kv[:, None] * kv[None, :]
    U = gam * U + kv[:, None] * vv[None, :]
    tl.store(hkk_out + bh * D * D + kk_tile, Hk)
    tl.store(hkv_out + bh * D * DV + kv_tile, U)
    if N > 0:
        f = tl.sqrt(tl.sum(tl.sum(Hk * Hk, 1), 0))
        f = tl.where(f > f_min, f, f_min)
        lam = r * f
        eta = 2.0 / ((1.0 + 2.0 * r) * f)
        x_prev = tl.zeros([D], dtype=tl.float32)
        x = eta * qv
        for i in range(N):
            om = tl.load(om_ptr + i)
            ax = tl.sum(Hk * x[None, :], 1) + lam * x    # H is symmetric: rows of H·x
            x_new = om * (x - eta * (ax - qv)) + (1.0 - om) * x_prev
            x_prev = x
            x = x_new
        al = tl.load(al_ptr + b * s_ab + h * s_ah).to(tl.float32)
        qv = qv + al * (x - qv)
    o = tl.sum(U * qv[:, None], 0) * scale
    tl.store(o_ptr + bh * DV + rv, o.to(o_ptr.dtype.element_ty))


def gka_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor,
                    state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *, num_iter: int = 30,
                    ridge_ratio: float = 0.02, scale: Optional[float] = None,
                    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """q, k [B, H, D], v [B, H, DV], g, alpha [B, H]; state (h_kk [B, H, D, D], h_kv [B, H, D, DV]) or None.

    Returns o [B, H, DV] in q's dtype and the new fp32 state (fresh tensors; the given state is not modified)."""
    from .config import check_triton_inputs
    check_triton_inputs(q, v)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    h0, u0 = state if state is not None else (None, None)
    if torch.compiler.is_compiling():
        # dynamo cannot trace the launch; the op is opaque to it (ops.py), and a CUDA graph can hold it
        from .ops import step
        o, hkk, hkv = step(q, k, v, g, alpha, h0, u0, int(num_iter), float(ridge_ratio), scale)
        return o, (hkk, hkv)
    return triton_step(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale)


def triton_step(q, k, v, g, alpha, h0, u0, num_iter: int, ridge_ratio: float, scale: float):
    """The launch of gka_step_triton (checked inputs; h0 and u0 both given or both None)."""
    B, H, D = q.shape
    DV = v.shape[-1]
    hkk_out = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32)
    hkv_out = torch.empty(B, H, D, DV, device=q.device, dtype=torch.float32)
    o = torch.empty(B, H, DV, device=q.device, dtype=q.dtype)
    if B * H == 0:
        return o, (hkk_out, hkv_out)   # nothing to launch (a grid of zero programs)
    if h0 is not None:
        hkk_in = h0.to(torch.float32).contiguous()
        hkv_in = u0.to(torch.float32).contiguous()
    else:
        hkk_in, hkv_in = hkk_out, hkv_out
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    om = _omegas(num_iter, ridge_ratio, q.device)
    _step_kernel[(B * H,)](
        q, k, v, g, alpha, hkk_in, hkv_in, hkk_out, hkv_out, o, om,
        H, float(ridge_ratio), float(scale), F_MIN,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), alpha.stride(0), alpha.stride(1),
        D=D, DV=DV, N=num_iter, HAS_STATE=h0 is not None, num_warps=8 if D == 128 else 4,
    )
    return o, (hkk_out, hkv_out)
