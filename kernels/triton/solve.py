"""The fused per-chunk kernel (gka_spec.md §4 steps B and C): Frobenius norms, the N-step Chebyshev solve with
the iterate kept on chip, the α-mix and the gated-linear-attention readout, one program per (chunk, b·h).

The same kernel, with the forward's f loaded and no readout, is the adjoint solve of the backward (§5.1)."""
from __future__ import annotations

import functools

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..chebyshev import chebyshev_omegas, error_gains
from .config import F_MIN
from .dots import _lo, _mm, _mm16, _mm_t, _op, _xdot


@triton.jit
def _apply(x, A0, A0l, Km, Ktm, Mk, ee, lam, sc, MODE: tl.constexpr, ILP: tl.constexpr, TRANS: tl.constexpr):
    """(H_τ + λ_τ I) applied to the iterate: rows x [C, D] with A0 = H⁰, Mk = M; or (TRANS) columns xᵀ [D, C] with
    A0 = H⁰ᵀ, Mk = Mᵀ (the row form multiplies by H⁰ from the right, i.e. applies H⁰ᵀ: an initial state may be
    non-symmetric). sc is a scale of the fp16 modes, unused by the others.
    MODE 6 / 7 (rows only): A0 = fp16(H⁰ / max|H⁰|), the H⁰ product on the rows scaled by sc = ys [C, 1] (to
    O(1 / r), fp16's range), ee = e·max|H⁰| / ys; the in-chunk products as MODE 5 (6) or 4 (7).
    MODE 8 (the fast leading steps): every product single-pass fp16 on an iterate that is scaled already, with
    A0 = fp16(H⁰ / max|H⁰|), ee = e·max|H⁰|, Km / Ktm = fp16(K / max|K|) and sc = max|K|², so the scores of the
    scaled rows stay O(√D / r) whatever the keys' magnitude (unscaled keys of norm 5e4 overflowed fp16)."""
    if MODE == 8:
        yh = x.to(tl.float16)
        out = ee * tl.dot(yh, A0) + sc * tl.dot((tl.dot(yh, Ktm) * Mk).to(tl.float16), Km) + lam * x
    elif MODE == 6:
        out = ee * _mm16(x * sc, A0, ILP) \
            + _mm(_mm(x, Ktm, Ktm, 5, False, ILP) * Mk, Km, Km, 5, False, ILP) + lam * x
    elif MODE == 7:
        out = ee * _mm16(x * sc, A0, ILP) \
            + _mm(_mm(x, Ktm, Ktm, 4, False, ILP) * Mk, Km, Km, 4, False, ILP) + lam * x
    elif TRANS:
        out = ee * _mm_t(A0, A0l, x, MODE, True, ILP) \
            + _mm_t(Ktm, Ktm, _mm_t(Km, Km, x, MODE, False, ILP) * Mk, MODE, False, ILP) + lam * x
    else:
        out = ee * _mm(x, A0, A0l, MODE, True, ILP) \
            + _mm(_mm(x, Ktm, Ktm, MODE, False, ILP) * Mk, Km, Km, MODE, False, ILP) + lam * x
    return out


@triton.jit
def _cheb_solve(rhs, K, Kt, H0, M, e, f, r, om_ptr, C: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
                MODE: tl.constexpr, FAST: tl.constexpr, FAST_MODE: tl.constexpr, ILP: tl.constexpr,
                TRANS: tl.constexpr):
    """N Chebyshev steps for (H_τ + r f_τ I) x_τ = rhs_τ, all rows of the chunk at once, iterate on chip.

    H_τ x = e_τ H⁰x + Σ_σ M[τ,σ] (k_σ·x) k_σ: three dots per step. f is floored already. In MODE 5 the keys
    must be exact in bf16 (bf16 inputs); H⁰ and the masked scores are split into hi + lo. TRANS iterates on xᵀ
    [D, C] instead, so two of the three products have D rows (H⁰ᵀxᵀ and Kᵀ(Mᵀ∘Kxᵀ)): M = 64 tiles, which
    Hopper's wgmma needs, where the row form has C = 32 (benchmarks/KERNEL_NOTES.md, v6; opt-in until timed)."""
    if MODE == 6:   # the in-chunk products of MODE 6 / 7 run as MODE 5 / 4
        Km = _op(K, 5)
        Ktm = _op(Kt, 5)
    elif MODE == 7:
        Km = _op(K, 4)
        Ktm = _op(Kt, 4)
    else:
        Km = _op(K, MODE)
        Ktm = _op(Kt, MODE)
    ys = f[:, None]   # the row scale of the fp16 products (MODE 6 / 7 / 8); unused otherwise
    if TRANS:
        A0 = tl.trans(_op(H0, MODE))
        A0l = tl.trans(_lo(H0, MODE))
        A0h = A0
        Mk = tl.trans(M)
        b = tl.trans(rhs)
        lam = (r * f)[None, :]
        eta = (2.0 / ((1.0 + 2.0 * r) * f))[None, :]
        ee = e[None, :]
        eeh = ee
        x_prev = tl.zeros([D, C], dtype=tl.float32)
    else:
        Mk = M
        b = rhs
        lam = (r * f)[:, None]
        eta = (2.0 / ((1.0 + 2.0 * r) * f))[:, None]
        ee = e[:, None]
        A0 = _op(H0, MODE)
        A0l = _lo(H0, MODE)
        A0h = A0
        eeh = ee
        if MODE >= 6 or FAST_MODE == 8:
            # ‖x_τ‖ ≤ ‖rhs_τ‖ / (r f_τ), so rows scaled by f_τ / ‖rhs_τ‖ stay within 1 / r of the origin (fp16 holds
            # them for r ≥ 1e-3, which dot_mode and solve_schedule check); H⁰ / max|H⁰| has entries ≤ 1. Both
            # scales divide by the largest entry before squaring: a decayed state (entries ~1e-25) squares to 0 in
            # fp32, and a floored norm would then blow H⁰ up past fp16's range (inf at T = 65,536, session 4).
            hn = tl.max(tl.max(tl.abs(H0), 1), 0)
            hn = tl.where(hn > 0.0, hn, 1.0)
            rm = tl.max(tl.abs(rhs), 1)
            rs = rhs / tl.where(rm > 0.0, rm, 1.0)[:, None]
            rn = rm * tl.sqrt(tl.sum(rs * rs, 1))
            # a zero row stays zero under any scale; the clamps keep ys and 1 / ys finite
            ys = tl.where(rn > 0.0, tl.minimum(tl.maximum(f / tl.where(rn > 0.0, rn, 1.0), 1e-30), 1e30), 1.0)[:, None]
            A0h = (H0 / hn).to(tl.float16)
            eeh = ee * hn
        if MODE >= 6:
            A0 = A0h
            A0l = A0h
            ee = eeh / ys
        x_prev = tl.zeros([C, D], dtype=tl.float32)
    x = eta * b
    # The first FAST steps take single-pass products: the remaining steps damp an early step's rounding error
    # (chebyshev.error_gains; solve_schedule picks FAST from it), so only the last steps need the split.
    if FAST_MODE == 8:
        # in fp16 on y = ys·x: the operator acts on each row alone, so the scaled iterate follows the same recurrence
        # with rhs·ys, and the scale is applied once instead of at every step
        km = tl.max(tl.max(tl.abs(K), 1), 0)
        km = tl.where(km > 0.0, km, 1.0)
        Kh = (K / km).to(tl.float16)
        Kth = (Kt / km).to(tl.float16)
        yb = b * ys
        y = x * ys
        y_prev = x_prev
        for i in range(FAST):
            om = tl.load(om_ptr + i)
            y_new = om * (y - eta * (_apply(y, A0h, A0h, Kh, Kth, Mk, eeh, lam, km * km, 8, ILP, TRANS) - yb)) \
                + (1.0 - om) * y_prev
            y_prev = y
            y = y_new
        x = y / ys
        x_prev = y_prev / ys
    else:
        for i in range(FAST):
            om = tl.load(om_ptr + i)
            x_new = om * (x - eta * (_apply(x, A0, A0l, Km, Ktm, Mk, ee, lam, ys, FAST_MODE, ILP, TRANS) - b)) \
                + (1.0 - om) * x_prev
            x_prev = x
            x = x_new
    for i in range(FAST, N):
        om = tl.load(om_ptr + i)
        x_new = om * (x - eta * (_apply(x, A0, A0l, Km, Ktm, Mk, ee, lam, ys, MODE, ILP, TRANS) - b)) \
            + (1.0 - om) * x_prev
        x_prev = x
        x = x_new
    if TRANS:
        x = tl.trans(x)
    return x


@triton.jit
def _chunk_solve_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, al_ptr, h0_ptr, u0_ptr, om_ptr, f_ptr, x_ptr, o_ptr,
        T, H, NC, r, scale, f_min,
        s_qb, s_qt, s_qh,
        s_kb, s_kt, s_kh,
        s_vb, s_vt, s_vh,
        s_gb, s_gt, s_gh,
        s_ab, s_at, s_ah,
        s_xb, s_xt, s_xh,
        s_ob, s_ot, s_oh,
        D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, N: tl.constexpr, MODE: tl.constexpr,
        FAST: tl.constexpr, FAST_MODE: tl.constexpr, ILP: tl.constexpr, TRANS: tl.constexpr, ACC: tl.constexpr,
        LOAD_F: tl.constexpr, READOUT: tl.constexpr, STORE_X: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)   # b·h on the axis without the 65,535 limit
    ic = tl.program_id(1)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, D)
    t = ic * C + rc
    tm = t < T

    K = tl.load(k_ptr + b * s_kb + h * s_kh + t[:, None] * s_kt + rd[None, :], mask=tm[:, None],
                other=0.0).to(tl.float32)
    Q = tl.load(q_ptr + b * s_qb + h * s_qh + t[:, None] * s_qt + rd[None, :], mask=tm[:, None],
                other=0.0).to(tl.float32)
    gl = tl.load(g_ptr + b * s_gb + h * s_gh + t * s_gt, mask=tm, other=0.0).to(tl.float32)
    gc = tl.cumsum(gl, 0)
    e = tl.exp(gc)
    causal = rc[:, None] >= rc[None, :]
    # exponentiate only the non-positive (causal) differences, then select
    M = tl.where(causal, tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
    Kt = tl.trans(K)
    H0 = tl.load(h0_ptr + (bh * NC + ic) * D * D + rd[:, None] * D + rd[None, :])

    if N > 0:
        if LOAD_F:
            f = tl.load(f_ptr + b * s_gb + h * s_gh + t * s_gt, mask=tm, other=f_min)
            f = tl.maximum(f, f_min)
        else:
            # ‖H_τ‖²_F = e²‖H⁰‖² + 2e Σ_σ M[τ,σ] k_σᵀH⁰k_σ + Σ_{σ,σ'} M[τ,σ] M[τ,σ'] (k_σ·k_σ')²
            kHk = tl.sum(_xdot(K, H0, True, False, ACC) * K, 1)
            S = _xdot(K, Kt, True, True, ACC)
            MP = _xdot(M, S * S, False, False, ACC)
            hn = tl.sum(tl.sum(H0 * H0, 1), 0)
            f2 = e * e * hn + 2.0 * e * tl.sum(M * kHk[None, :], 1) + tl.sum(MP * M, 1)
            f = tl.sqrt(tl.maximum(f2, 0.0))
            f = tl.where(f > f_min, f, f_min)
            tl.store(f_ptr + b * s_gb + h * s_gh + t * s_gt, f, mask=tm)
        x = _cheb_solve(Q, K, Kt, H0, M, e, f, r, om_ptr, C, D, N, MODE, FAST, FAST_MODE, ILP, TRANS)
        if STORE_X:
            tl.store(x_ptr + b * s_xb + h * s_xh + t[:, None] * s_xt + rd[None, :], x, mask=tm[:, None])

    if READOUT:
        if N > 0:
            al = tl.load(al_ptr + b * s_ab + h * s_ah + t * s_at, mask=tm, other=0.0).to(tl.float32)
            Qt = Q + al[:, None] * (x - Q)
        else:
            Qt = Q
        rv = tl.arange(0, DV)
        V = tl.load(v_ptr + b * s_vb + h * s_vh + t[:, None] * s_vt + rv[None, :], mask=tm[:, None],
                    other=0.0).to(tl.float32)
        U0 = tl.load(u0_ptr + (bh * NC + ic) * D * DV + rd[:, None] * DV + rv[None, :])
        O = e[:, None] * _xdot(Qt, U0, N == 0, False, ACC) \
            + _xdot(_xdot(Qt, Kt, N == 0, True, ACC) * M, V, False, True, ACC)
        O = O * scale
        tl.store(o_ptr + b * s_ob + h * s_oh + t[:, None] * s_ot + rv[None, :], O.to(o_ptr.dtype.element_ty),
                 mask=tm[:, None])


_MODES = {'ieee': 0, 'tf32': 1, 'tf32x3': 4, 'bf16x3': 5}


def dot_mode(dot: str, dtype: torch.dtype, ridge_ratio: Optional[float] = None) -> int:
    """The kernels' MODE number of a ``config.solve_dot_mode`` name for inputs of ``dtype``.

    'h16x2' (the default for bf16 at D = 64, config.solve_dot_mode): the H⁰ product as two fp16 MMAs on rescaled
    rows, the in-chunk products as in 'bf16x3' (bf16 inputs: MODE 6) or 'tf32x3' (fp16: MODE 7); 6 bf16 MMAs per
    step instead of 7. Its rescaling needs r ≥ 1e-3 (iterate rows within 1 / r of the origin in fp16); smaller ridge
    ratios keep the bf16 split."""
    if dot == 'lowp':
        return 3 if dtype == torch.float16 else 2
    if dot == 'h16x2':
        if ridge_ratio is not None and ridge_ratio < 1e-3:
            return dot_mode('bf16x3', dtype)
        return 6 if dtype == torch.bfloat16 else 7
    if dot == 'bf16x3' and dtype != torch.bfloat16:
        return 4   # the split needs keys exact in bf16, and fp16 iterates can overflow
    return _MODES[dot]


# Leading steps run single-pass in fp16 (on rows scaled to O(1 / r), MODE 8) while the rounding they leave, u·Σγ_k with
# u = 2⁻¹¹ and γ_k the damping of the steps after them (chebyshev.error_gains), stays under the tolerance. The float64
# emulation (benchmarks/solve_precision.py, N 20/30, r 0.005-0.1) puts the extra error of o at ≤ 0.7 and of ∂k at
# ≤ 4.6 times that sum, so 4e-4 keeps o within ~3e-4 of its floor. bf16 inputs get 1e-3: their output's own
# rounding (1.66e-3) absorbs the extra in quadrature, and the H200 measured 17 fast steps (Σ 8.6e-4 at N = 30,
# r = 0.02) at o 1.69e-3 and ∂k 2.40e-3 against 1.67e-3 and 2.34e-3 without any, 4-5 % faster gka_small inference
# (benchmarks/ab.py, session 5); 20 steps (Σ 1.7e-3) took ∂k to 3.4e-3.
# Below r = 0.02 ∂k is far more sensitive than the emulation says (the H200, session 5: one fast step at r = 0.005,
# 3.8e-4 of the budget, took ∂k from 2.4e-3 to 8.8e-3; the interpreter's fp16 path agrees: +1.6e-3 to +3.7e-3 there,
# +3.5e-4 for one step at r = 0.01, +1.5e-4 for the 13 at r = 0.02), about as 1 / r², so the tolerance shrinks so.
FAST_UNIT = 2.0 ** -11
FAST_TOL = 4e-4
FAST_TOL_BF16 = 1e-3
FAST_TOL_R = 0.02   # the tolerance holds down to this ridge ratio and scales with (r / FAST_TOL_R)² below it


@functools.lru_cache(maxsize=64)
def fast_steps(num_iter: int, ridge_ratio: float, tol: float = FAST_TOL) -> int:
    """How many leading steps of an N-step solve may take single-pass fp16 products (0 for r < 1e-3: fp16's range);
    tol: FAST_TOL, or FAST_TOL_BF16 for bf16 inputs."""
    if ridge_ratio < 1e-3 or num_iter < 2:
        return 0
    tol = tol * min(1.0, (ridge_ratio / FAST_TOL_R) ** 2)
    total, n = 0.0, 0
    for gain in error_gains(int(num_iter), float(ridge_ratio))[:-1]:
        total += FAST_UNIT * gain
        if total > tol:
            break
        n += 1
    return n


def solve_schedule(mode: int, num_iter: int, ridge_ratio: float) -> dict:
    """Kernel constants of the iteration schedule: FAST leading steps with single-pass products (split modes only),
    FAST_MODE their product mode, ILP independent accumulators for the split products, TRANS the iteration on xᵀ.

    By default the split modes (4-7) run ``fast_steps(N, r, tol)`` leading steps in single-pass fp16 (MODE 8), with
    the larger tolerance for bf16 inputs (modes 5 and 6).
    Overrides (benchmarks): ``GKA_TRITON_FAST_ITERS=n`` the number of fast steps, ``GKA_TRITON_FAST_DOT=lowp``
    single-pass bf16 / tf32 fast steps instead (modes 5 / 4, the only ones the transposed solve has),
    ``GKA_TRITON_ILP`` (default 1) and ``GKA_TRITON_SOLVE_T`` (default 0)."""
    ilp = os.environ.get('GKA_TRITON_ILP', '1') != '0'
    trans = os.environ.get('GKA_TRITON_SOLVE_T', '0') == '1' and mode < 6   # MODE 6 / 7: rows only
    fast_dot = os.environ.get('GKA_TRITON_FAST_DOT', 'fp16')
    if fast_dot not in ('fp16', 'lowp'):
        raise ValueError(f'GKA_TRITON_FAST_DOT must be fp16 or lowp, got {fast_dot!r}')
    fp16_ok = ridge_ratio >= 1e-3 and not trans
    if mode in (6, 7) or (mode in (4, 5) and fast_dot == 'fp16' and fp16_ok):
        fast_mode = 8
    else:
        fast_mode = {5: 2, 4: 1}.get(mode, mode)
    env = os.environ.get('GKA_TRITON_FAST_ITERS')
    if fast_mode == mode:
        fast = 0   # no split to skip
    elif env is not None:
        fast = int(env)
    else:
        # modes 5 and 6 are bf16 inputs' (dot_mode)
        tol = FAST_TOL_BF16 if mode in (5, 6) else FAST_TOL
        fast = fast_steps(num_iter, ridge_ratio, tol) if fast_mode == 8 else 0
    fast = max(0, min(fast, num_iter))
    if fast == 0 and mode in (4, 5):
        fast_mode = {5: 2, 4: 1}[mode]   # no fast steps: no fp16 operands to prepare
    return dict(FAST=fast, FAST_MODE=fast_mode, ILP=ilp, TRANS=trans)


def acc_precision(dtype: torch.dtype) -> str:
    """Operand precision of the fixed (not iterated) dots: norms, readout, gradients, state passes (dots.py).

    fp32 inputs: 'ieee'. bf16: 'bf16x3', hi/lo bf16 splits of the operands not exact in bf16 (1-3 bf16 MMAs per
    product instead of tf32x3's three tf32 ones). fp16: 'tf32x3' (fp16 tiles are not exact in bf16).
    ``GKA_TRITON_ACC=tf32|tf32x3|ieee|bf16x3`` (16-bit inputs only; bf16x3 for bf16) overrides it (benchmarks):
    plain tf32 costs ~3e-4 relative error per product, which the ∂g sums amplify to 3e-2 (KERNEL_NOTES.md)."""
    if dtype == torch.float32:
        return 'ieee'
    default = 'bf16x3' if dtype == torch.bfloat16 else 'tf32x3'
    acc = os.environ.get('GKA_TRITON_ACC', default)
    if acc not in ('tf32', 'tf32x3', 'ieee', 'bf16x3'):
        raise ValueError(f'GKA_TRITON_ACC must be tf32, tf32x3, ieee or bf16x3, got {acc!r}')
    if acc == 'bf16x3' and dtype != torch.bfloat16:
        return default   # the split assumes the loaded tiles are exact in bf16
    return acc


@functools.lru_cache(maxsize=64)
def _omegas_cached(num_iter: int, ridge_ratio: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(chebyshev_omegas(num_iter, ridge_ratio) or (0.0,), dtype=torch.float32, device=device)


def _omegas(num_iter: int, ridge_ratio: float, device: torch.device) -> torch.Tensor:
    """The ω schedule on the device, made once per (N, r, device): a host-to-device copy per call would cost a
    sync per layer and make the kernels impossible to capture in a CUDA graph (decoding)."""
    return _omegas_cached(int(num_iter), float(ridge_ratio), torch.device(device))


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _num_warps(D: int, C: int) -> int:
    env = os.environ.get('GKA_TRITON_WARPS')   # benchmarks only
    if env:
        return int(env)
    return 8 if D * C >= 128 * 64 or D == 128 else 4


def chunk_forward(q, k, v, g, alpha, H0, U0, num_iter: int, ridge_ratio: float, scale: float, chunk_size: int,
                  dot: str, store_x: bool = True, out: Optional[Tuple] = None,
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """q, k [B, T, H, D], v [B, T, H, DV], g/alpha [B, T, H]; H0, U0 the chunk-entry states [B·H, NC, D, D|DV].

    Returns o [B, T, H, DV] (dtype of q), the solve output x [B, T, H, D] fp32 (None when num_iter = 0 or not
    ``store_x``: only the backward reads it) and f [B, T, H] fp32 (None when num_iter = 0).
    ``out``: (o, x, f) views of longer tensors to write into instead (one segment of a sequence); f must then have
    the strides of g."""
    B, T, H, D = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    solve = num_iter > 0
    if out is None:
        o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
        x = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32) if solve and store_x else None
        gs = g if g.stride() == (T * H, H, 1) or not solve else g.contiguous()
        f = torch.empty(B, T, H, device=q.device, dtype=torch.float32) if solve else None
    else:
        (o, x, f), gs = out, g
        assert f is None or f.stride() == gs.stride()
    mode = dot_mode(dot, q.dtype, ridge_ratio)
    _chunk_solve_kernel[(B * H, NC)](
        q, k, v, gs, alpha, H0, U0, _omegas(num_iter, ridge_ratio, q.device),
        f if solve else gs, x if x is not None else o, o,
        T, H, NC, float(ridge_ratio), float(scale), F_MIN,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(gs), *_strides3(alpha),
        *(_strides3(x) if x is not None else (0, 0, 0)), *_strides3(o),
        D=D, DV=DV, C=chunk_size, N=num_iter, MODE=mode, **solve_schedule(mode, num_iter, ridge_ratio),
        ACC=acc_precision(q.dtype), LOAD_F=False, READOUT=True,
        STORE_X=x is not None, num_warps=_num_warps(D, chunk_size),
    )
    return o, x, f


def chunk_adjoint_solve(rhs: torch.Tensor, k: torch.Tensor, g: torch.Tensor, f: torch.Tensor, H0: torch.Tensor,
                        num_iter: int, ridge_ratio: float, chunk_size: int, dot: str) -> torch.Tensor:
    """u = A⁻¹ rhs with the forward's norms f [B, T, H] (fp32; g and f both contiguous [B, T, H]).

    k [B, T, H, D]; rhs [B, T', H, D] with T' ≥ T (rows past T are ignored) and any strides; u [B, T, H, D] fp32."""
    B, T, H, D = k.shape
    NC = triton.cdiv(T, chunk_size)
    u = torch.empty(B, T, H, D, device=rhs.device, dtype=torch.float32)
    assert g.is_contiguous() and f.is_contiguous() and g.dtype == torch.float32
    mode = dot_mode(dot, k.dtype, ridge_ratio)
    _chunk_solve_kernel[(B * H, NC)](
        rhs, k, rhs, g, f, H0, H0, _omegas(num_iter, ridge_ratio, rhs.device), f, u, u,
        T, H, NC, float(ridge_ratio), 1.0, F_MIN,
        *_strides3(rhs), *_strides3(k), *_strides3(rhs), *_strides3(f), *_strides3(f),
        *_strides3(u), *_strides3(u),
        D=D, DV=D, C=chunk_size, N=num_iter, MODE=mode, **solve_schedule(mode, num_iter, ridge_ratio),
        ACC=acc_precision(k.dtype), LOAD_F=True, READOUT=False,
        STORE_X=True, num_warps=_num_warps(D, chunk_size),
    )
    return u
