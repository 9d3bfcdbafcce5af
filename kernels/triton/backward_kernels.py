"""Triton kernels of the backward pass (gka_spec.md §5.2-5.3), one program per (chunk, b·h).

``_bwd_chunk_kernel`` does everything that needs only the chunk and its boundary states: the readout gradient
(∂q̃, ∂k, ∂v and ∂Γ of o = s·U_τᵀq̃), the adjoint solve u = A⁻¹(α·∂q̃) on chip, and the chunk-local terms of the
implicit gradient through the Gram (rank-1 terms, λ-path, ⟨Ḡ, H⟩) plus the chunk's own increment of the gradient
w.r.t. its entry Gram. ``_bwd_inter_kernel`` adds the part carried in from later chunks once the reverse scan of
those increments is known. All [B, T, H, ·] tensors are contiguous.

The chunk-boundary states come from a pass at a coarser state chunk of SR sub-chunks
(``config.backward_state_chunk``): each program carries the Gram and KV states forward from the start of its state
chunk, and the readout's state gradient backward from its end, over at most SR − 1 neighbouring sub-chunks
(``_advance``, ``_retreat``: the same recurrences as state_pass.py). Fewer fp32 D×D states exist at a time, for a
few small products per program (KERNEL_NOTES.md, v15).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dots import _xdot
from .solve import _cheb_solve
from .state_pass import _chunk_update


@triton.jit
def _advance(S, a_ptr, x_ptr, g_ptr, b, h, s_from, s_to, T, H,
             DA: tl.constexpr, DX: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr):
    """S carried forward over sub-chunks [s_from, s_to) (state_pass's forward recurrence)."""
    rc = tl.arange(0, C)
    for s in range(s_from, s_to):
        t = s * C + rc
        tm = t < T
        row = (b * T + t) * H + h
        gl = tl.load(g_ptr + row, mask=tm, other=0.0)
        A = tl.load(a_ptr + row[:, None] * DA + tl.arange(0, DA)[None, :], mask=tm[:, None], other=0.0)
        X = tl.load(x_ptr + row[:, None] * DX + tl.arange(0, DX)[None, :], mask=tm[:, None], other=0.0)
        S = _chunk_update(S, A.to(tl.float32), X.to(tl.float32), gl, 1.0, False, ACC, True)
    return S


@triton.jit
def _retreat(R, q_ptr, x_ptr, al_ptr, do_ptr, g_ptr, b, h, s_lo, s_hi, T, H, scale,
             D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, N: tl.constexpr, ACC: tl.constexpr):
    """The readout's state gradient R carried backward over sub-chunks s_hi − 1 down to s_lo (state_pass's reverse
    recurrence with a = q̃, x = do)."""
    rc = tl.arange(0, C)
    rd = tl.arange(0, D)
    for i in range(s_hi - s_lo):
        t = (s_hi - 1 - i) * C + rc
        tm = t < T
        row = (b * T + t) * H + h
        m2 = tm[:, None]
        gl = tl.load(g_ptr + row, mask=tm, other=0.0)
        Qt = tl.load(q_ptr + row[:, None] * D + rd[None, :], mask=m2, other=0.0).to(tl.float32)
        if N > 0:
            X = tl.load(x_ptr + row[:, None] * D + rd[None, :], mask=m2, other=0.0)
            al = tl.load(al_ptr + row, mask=tm, other=0.0).to(tl.float32)
            Qt = Qt + al[:, None] * (X - Qt)
        dO = tl.load(do_ptr + row[:, None] * DV + tl.arange(0, DV)[None, :], mask=m2, other=0.0).to(tl.float32)
        R = _chunk_update(R, Qt, dO, gl, scale, True, ACC, True)
    return R


@triton.jit
def _bwd_chunk_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, al_ptr, x_ptr, f_ptr, do_ptr, h0_ptr, u0_ptr, ru_ptr, om_ptr,
        dq_ptr, dk_ptr, dv_ptr, dgam_ptr, dal_ptr, inc_ptr,
        T, H, NC, NCS, r, scale, f_min,
        D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, N: tl.constexpr, MODE: tl.constexpr,
        FAST: tl.constexpr, FAST_MODE: tl.constexpr, ILP: tl.constexpr, TRANS: tl.constexpr, ACC: tl.constexpr,
        SR: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)   # b·h on the axis without the 65,535 limit
    ic = tl.program_id(1)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, D)
    rv = tl.arange(0, DV)
    t = ic * C + rc
    tm = t < T
    row = (b * T + t) * H + h                    # index of (b, t, h) in [B, T, H]
    pk = row[:, None] * D + rd[None, :]          # [C, D] tile offsets
    pv = row[:, None] * DV + rv[None, :]         # [C, DV] tile offsets
    m2 = tm[:, None]

    gl = tl.load(g_ptr + row, mask=tm, other=0.0)
    gc = tl.cumsum(gl, 0)
    glast = tl.sum(gl, 0)
    e = tl.exp(gc)
    bdec = tl.exp(glast - gc)
    causal = rc[:, None] >= rc[None, :]
    M = tl.where(causal, tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)

    K = tl.load(k_ptr + pk, mask=m2, other=0.0).to(tl.float32)
    Kt = tl.trans(K)
    js = ic // SR                                # the state chunk holding this chunk, and its sub-chunk range
    s_first = js * SR
    s_end = tl.minimum(s_first + SR, NC)
    V = tl.load(v_ptr + pv, mask=m2, other=0.0).to(tl.float32)
    dO = tl.load(do_ptr + pv, mask=m2, other=0.0).to(tl.float32)
    A = _xdot(dO, tl.trans(V), True, True, ACC) * M          # A[τ,σ] = M[τ,σ] (do_τ·v_σ)
    U0 = tl.load(u0_ptr + (bh * NCS + js) * D * DV + rd[:, None] * DV + rv[None, :])
    if SR > 1:
        U0 = _advance(U0, k_ptr, v_ptr, g_ptr, b, h, s_first, ic, T, H, D, DV, C, ACC)
    dqt = scale * (e[:, None] * _xdot(dO, tl.trans(U0), True, False, ACC) + _xdot(A, K, False, True, ACC))
    Q = tl.load(q_ptr + pk, mask=m2, other=0.0).to(tl.float32)
    if N > 0:
        X = tl.load(x_ptr + pk, mask=m2, other=0.0)
        al = tl.load(al_ptr + row, mask=tm, other=0.0).to(tl.float32)
        Qt = Q + al[:, None] * (X - Q)
        tl.store(dal_ptr + row, tl.sum(dqt * (X - Q), 1), mask=tm)
    else:
        Qt = Q
    RU = tl.load(ru_ptr + (bh * NCS + js) * D * DV + rd[:, None] * DV + rv[None, :])
    if SR > 1:
        RU = _retreat(RU, q_ptr, x_ptr, al_ptr, do_ptr, g_ptr, b, h, ic + 1, s_end, T, H, scale, D, DV, C, N,
                      ACC)
    dk = scale * _xdot(tl.trans(A), Qt, False, N == 0, ACC) \
        + bdec[:, None] * _xdot(V, tl.trans(RU), True, False, ACC)
    Bm = _xdot(Qt, Kt, N == 0, True, ACC) * M                 # B[τ,σ] = M[τ,σ] (q̃_τ·k_σ)
    dv = scale * _xdot(tl.trans(Bm), dO, False, True, ACC) + bdec[:, None] * _xdot(K, RU, True, False, ACC)
    tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=m2)
    dgam = tl.sum(Qt * dqt, 1) - tl.sum(K * dk, 1)

    if N > 0:
        H0 = tl.load(h0_ptr + (bh * NCS + js) * D * D + rd[:, None] * D + rd[None, :])
        if SR > 1:
            H0 = _advance(H0, k_ptr, k_ptr, g_ptr, b, h, s_first, ic, T, H, D, D, C, ACC)
        f = tl.maximum(tl.load(f_ptr + row, mask=tm, other=f_min), f_min)
        Ua = _cheb_solve(al[:, None] * dqt, K, Kt, H0, M, e, f, r, om_ptr, C, D, N, MODE, FAST, FAST_MODE, ILP,
                         TRANS)
        tl.store(dq_ptr + pk, ((1.0 - al[:, None]) * dqt + Ua).to(dq_ptr.dtype.element_ty), mask=m2)
        # Gram part of the implicit gradient: Ḡ_τ = −u_τx_τᵀ − c_τH_τ, c_τ = r(u_τ·x_τ)/f_τ (λ-path)
        c = tl.where(f > f_min, r * tl.sum(Ua * X, 1) / f, 0.0)
        XK = _xdot(X, Kt, False, True, ACC) * M
        UK = _xdot(Ua, Kt, False, True, ACC) * M
        rank1 = _xdot(tl.trans(XK), Ua, False, False, ACC) + _xdot(tl.trans(UK), X, False, False, ACC)
        ce = c * e
        W1 = tl.sum(M * ce[:, None], 0)                          # W1[σ] = Σ_τ M[τ,σ] c_τ e_τ
        W2 = _xdot(tl.trans(M), c[:, None] * M, False, False, ACC)
        KK = _xdot(K, Kt, True, True, ACC)
        lam_path = 2.0 * (W1[:, None] * _xdot(K, H0, True, False, ACC) + _xdot(W2 * KK, K, False, True, ACC))
        dk_i = -(rank1 + lam_path)
        HX = e[:, None] * _xdot(X, H0, False, False, ACC) + _xdot(XK, K, False, True, ACC)
        dgam = dgam - tl.sum(Ua * HX, 1) - c * f * f - 0.5 * tl.sum(K * dk_i, 1)
        dk = dk + dk_i
        inc = -_xdot(tl.trans(e[:, None] * Ua), X, False, False, ACC) - tl.sum(ce * e, 0) * H0 \
            - _xdot(tl.trans(W1[:, None] * K), K, False, True, ACC)
        tl.store(inc_ptr + (bh * NC + ic) * D * D + rd[:, None] * D + rd[None, :], inc)
    else:
        tl.store(dq_ptr + pk, dqt.to(dq_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + pk, dk, mask=m2)
    tl.store(dgam_ptr + row, dgam, mask=tm)


@triton.jit
def _bwd_inter_kernel(
        k_ptr, g_ptr, rh_ptr, dk_ptr, dk_out_ptr, dgam_ptr, T, H, NC,
        D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr,
):
    """dk_σ += b_σ (R + Rᵀ) k_σ with R the gradient w.r.t. the chunk's exit Gram, and the matching −½ k·dk in
    the ∂Γ of the same token. The sum goes to dk_out in its dtype (k's: no separate cast of the fp32 dk)."""
    bh = tl.program_id(0).to(tl.int64)   # b·h on the axis without the 65,535 limit
    ic = tl.program_id(1)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, D)
    t = ic * C + rc
    tm = t < T
    row = (b * T + t) * H + h
    pk = row[:, None] * D + rd[None, :]
    gl = tl.load(g_ptr + row, mask=tm, other=0.0)
    bdec = tl.exp(tl.sum(gl, 0) - tl.cumsum(gl, 0))
    K = tl.load(k_ptr + pk, mask=tm[:, None], other=0.0).to(tl.float32)
    R = tl.load(rh_ptr + (bh * NC + ic) * D * D + rd[:, None] * D + rd[None, :])
    inter = bdec[:, None] * (_xdot(K, R, True, False, ACC) + _xdot(K, tl.trans(R), True, False, ACC))
    dk = tl.load(dk_ptr + pk, mask=tm[:, None], other=0.0)
    tl.store(dk_out_ptr + pk, (dk + inter).to(dk_out_ptr.dtype.element_ty), mask=tm[:, None])
    dg = tl.load(dgam_ptr + row, mask=tm, other=0.0)
    tl.store(dgam_ptr + row, dg - 0.5 * tl.sum(K * inter, 1), mask=tm)
