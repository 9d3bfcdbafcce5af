"""Backward of the Triton backend: the implicit gradient of gka_spec.md §5.

``chunk_backward`` (``GKA_TRITON_BWD=fused``, the default at D ≤ 64): state passes at a coarse state chunk (entry
states recomputed, the reverse KV-gradient pass), one fused kernel per 16-token chunk (its boundary states carried
from the coarse ones, readout gradient + adjoint solve on chip + chunk-local Gram terms), the reverse scan of the
Gram-gradient increments, and one kernel for the terms carried in from later chunks.

``chunk_backward_hybrid`` (``GKA_TRITON_BWD=hybrid``, the default at D = 128): Triton state passes and adjoint
solve, and the per-chunk algebra as batched torch matmuls shared with the torch backend. At D = 128 the fused
kernel holds three 128×128 fp32 tiles (H⁰, U⁰, the KV-state gradient) and spills: on the H200 the fused backward
took ~48 ms at B4 T4096 H16 D128, this path ~22 ms even with the slower tf32 solve of v1
(benchmarks/KERNEL_NOTES.md).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton

from ..chebyshev import F_MIN
from ..torch_chunk.gram_backward import gram_backward_inter, gram_backward_intra
from ..torch_chunk.layout import chunk_decay, from_chunks, to_chunks
from ..torch_chunk.readout import readout_backward
from .backward_kernels import _bwd_chunk_kernel, _bwd_inter_kernel
from .config import backward_chunk_size, backward_state_chunk
from .solve import _num_warps, _omegas, acc_precision, chunk_adjoint_solve, dot_mode, solve_schedule
from .state_pass import chunk_states, gram_and_kv_states, scan_increments


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    B, H, nc, C = x.shape
    flat = x.reshape(B, H, nc * C)
    return flat.flip(-1).cumsum(-1).flip(-1).reshape(B, H, nc, C)


def _frob_inner(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return (a.to(b.dtype) * b.reshape(a.shape)).sum((-1, -2)) if a is not None else b.new_zeros(())


class _Recomputed(NamedTuple):
    do: torch.Tensor
    qt: Optional[torch.Tensor]
    H0s: torch.Tensor
    HT: Optional[torch.Tensor]
    U0s: torch.Tensor
    UT: Optional[torch.Tensor]
    RU: torch.Tensor
    dU_init: torch.Tensor
    acc: str


def _recompute(q, k, v, g, alpha, h0, u0, x, do, dHT, dUT, num_iter, scale, C, want_qt=False) -> _Recomputed:
    """What both backward paths rebuild first: chunk-entry Gram and KV states, the reverse pass of the readout's
    state gradient (from do and the final KV-state gradient) and, with ``want_qt``, the mixed query q̃ in fp32.

    The reverse pass mixes q̃ = q + α·(x − q) as it loads it: building it in torch first took four elementwise
    kernels over [B, T, H, D] fp32 (0.3-0.4 ms of 6.4 at B16 T4096 H6 on the H100, KERNEL_NOTES.md v25).
    ``GKA_TRITON_MIX_QT=0`` builds it in torch instead (A/B)."""
    B, T, H, _ = q.shape
    # do in v's dtype (autograd hands it so): the kernels treat its tiles as exact in that dtype (dots.py)
    do = v.new_zeros(B, T, H, v.shape[-1]) if do is None else do.to(v.dtype).contiguous()
    acc = acc_precision(q.dtype)
    f32 = torch.float32
    in_kernel = num_iter > 0 and not want_qt and os.environ.get('GKA_TRITON_MIX_QT', '1') != '0'
    if num_iter > 0 and not in_kernel:
        qt = q.to(f32) + alpha.to(f32)[..., None] * (x - q.to(f32))
    else:
        qt = q
    mix = (x.contiguous(), alpha.contiguous()) if in_kernel else None
    (H0s, HT), (U0s, UT) = gram_and_kv_states(k, v, g, h0, u0, C, want_final=dHT is not None or dUT is not None,
                                              prec=acc)
    RU, dU_init = chunk_states(qt, do, g, dUT, C, reverse=True, scale=scale, prec=acc, mix=mix)
    return _Recomputed(do, qt if want_qt else None, H0s, HT, U0s, UT, RU, dU_init, acc)


def chunk_backward(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, num_iter, r, scale, C, dot):
    """Gradients w.r.t. q, k, v, g, alpha, h0, u0 (q/k/v/alpha gradients in their dtypes, the rest fp32; the h0
    gradient None when nothing depends on it).

    x, f: the forward's solve outputs [B, T, H, D] and norms [B, T, H] (fp32), None when num_iter = 0.
    do, dHT, dUT: upstream gradients of o and the final states (each may be None)."""
    path = os.environ.get('GKA_TRITON_BWD') or ('fused' if q.shape[-1] <= 64 else 'hybrid')
    if path not in ('fused', 'hybrid'):
        raise ValueError(f'GKA_TRITON_BWD must be fused or hybrid, got {path!r}')
    if path == 'hybrid':
        return chunk_backward_hybrid(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, num_iter, r, scale, C, dot)
    B, T, H, D = q.shape
    DV = v.shape[-1]
    f32 = torch.float32
    C_state = backward_state_chunk(C)
    C = backward_chunk_size(C)
    C_state = max(C_state, C)
    q, k, v, alpha = q.contiguous(), k.contiguous(), v.contiguous(), alpha.contiguous()
    rc = _recompute(q, k, v, g, alpha, h0, u0, x, do, dHT, dUT, num_iter, scale, C_state)
    do, H0s, HT, U0s, UT, RU, dU_init, acc = rc.do, rc.H0s, rc.HT, rc.U0s, rc.UT, rc.RU, rc.dU_init, rc.acc
    NCS = H0s.shape[1]
    NC = triton.cdiv(T, C)
    del rc
    solve = num_iter > 0
    dq = torch.empty_like(q)
    dk = torch.empty(B, T, H, D, device=q.device, dtype=f32)
    dv = torch.empty_like(v)
    dgam = torch.empty(B, T, H, device=q.device, dtype=f32)
    dal = torch.empty(B, T, H, device=q.device, dtype=f32) if solve else torch.zeros(B, T, H, device=q.device)
    inc = torch.empty(B * H, NC, D, D, device=q.device, dtype=f32) if solve else None
    mode = dot_mode(dot, q.dtype, r)
    _bwd_chunk_kernel[(B * H, NC)](
        q, k, v, g, alpha, x if solve else q, f if solve else g, do, H0s, U0s, RU,
        _omegas(num_iter, r, q.device), dq, dk, dv, dgam, dal, inc if solve else H0s,
        T, H, NC, NCS, float(r), float(scale), F_MIN,
        D=D, DV=DV, C=C, N=num_iter, MODE=mode, **solve_schedule(mode, num_iter, r),
        ACC=acc, SR=C_state // C, num_warps=_num_warps(D, C),
    )
    del H0s, U0s, RU
    dH_init = None
    if solve or dHT is not None:
        if inc is None:
            inc = torch.zeros(B * H, NC, D, D, device=q.device, dtype=f32)
        last = torch.exp(torch.nn.functional.pad(g, (0, 0, 0, NC * C - T)).view(B, NC, C, H).sum(2))
        RH, dH_init = scan_increments(inc, last.permute(0, 2, 1).reshape(B * H, NC), dHT, reverse=True)
        dk32, dk = dk, torch.empty_like(k)
        _bwd_inter_kernel[(B * H, NC)](k, g, RH, dk32, dk, dgam, T, H, NC, D=D, C=C, ACC=acc, num_warps=4)
        del dk32
    else:
        dk = dk.to(k.dtype)
    # the returned final states depend on every log-decay: ∂Γ of the last token gets ⟨dState, State⟩
    if dHT is not None:
        dgam[:, -1] += _frob_inner(dHT, HT)
    if dUT is not None:
        dgam[:, -1] += _frob_inner(dUT, UT)
    # suffix sum over time on a [B, H, T] copy: torch scans a middle dim of [B, T, H] with only B·H threads
    # (0.54 ms of 7.1 at B16 T4096 H6 on the H200), the last dim in parallel
    dg = dgam.transpose(1, 2).flip(-1).cumsum(-1).flip(-1).transpose(1, 2).contiguous()
    dh0 = dH_init.view(B, H, D, D) if dH_init is not None else None
    return dq, dk, dv, dg, dal, dh0, dU_init.view(B, H, D, DV)


def chunk_backward_hybrid(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, num_iter, r, scale, C, dot):
    """As ``chunk_backward``, with the per-chunk algebra in torch (all gradients fp32)."""
    B, T, H, D = q.shape
    DV = v.shape[-1]
    f32 = torch.float32
    rc = _recompute(q, k, v, g, alpha, h0, u0, x, do, dHT, dUT, num_iter, scale, C, want_qt=True)
    do, qt, H0s, HT, U0s, UT, RU, dU_init, acc = rc
    NC = H0s.shape[1]

    Q, K, V, dO, Qt = (to_chunks(t.to(f32), C) for t in (q, k, v, do, qt))
    A = to_chunks(alpha.to(f32), C)
    d = chunk_decay(to_chunks(g.to(f32), C))
    H0 = H0s.view(B, H, NC, D, D)
    rg = readout_backward(dO, Qt, K, V, U0s.view(B, H, NC, D, DV), RU.view(B, H, NC, D, DV), d, scale)
    dk, dgamma = rg.dk, rg.dgamma
    dH_init = None
    if num_iter > 0:
        X = to_chunks(x, C)
        dA = (rg.dqt * (X - Q)).sum(-1)
        rhs = A[..., None] * rg.dqt
        ua = chunk_adjoint_solve(rhs.reshape(B, H, NC * C, D).transpose(1, 2), k, g, f, H0s, num_iter, r, C, dot)
        Ua = to_chunks(ua, C)
        dQ = (1 - A[..., None]) * rg.dqt + Ua
        fc = to_chunks(f, C)
        intra = gram_backward_intra(X, Ua, K, H0, d, fc, fc > F_MIN, r)
        RH, dH_init = scan_increments(intra.increment.reshape(B * H, NC, D, D).contiguous(),
                                      d.last.reshape(B * H, NC), dHT, reverse=True)
        dk_gram = intra.dk + gram_backward_inter(K, RH.view(B, H, NC, D, D), d)
        dgamma = dgamma + intra.dgamma_part - 0.5 * (K * dk_gram).sum(-1)
        dk = dk + dk_gram
    else:
        dA = torch.zeros_like(A)
        dQ = rg.dqt
        if dHT is not None:
            RH, dH_init = scan_increments(torch.zeros_like(H0s), d.last.reshape(B * H, NC), dHT, reverse=True)
            dk_gram = gram_backward_inter(K, RH.view(B, H, NC, D, D), d)
            dgamma = dgamma - 0.5 * (K * dk_gram).sum(-1)
            dk = dk + dk_gram
    # the returned final states depend on Γ at the last (padded) position
    if dHT is not None:
        dgamma[..., -1, -1] += _frob_inner(dHT, HT)
    if dUT is not None:
        dgamma[..., -1, -1] += _frob_inner(dUT, UT)
    dG = _reverse_cumsum(dgamma)
    dq, dk, dv, dg, dalpha = (from_chunks(t, T) for t in (dQ, dk, rg.dv, dG, dA))
    dh0 = dH_init.view(B, H, D, D) if dH_init is not None else None
    return dq, dk, dv, dg, dalpha, dh0, dU_init.view(B, H, D, DV)
