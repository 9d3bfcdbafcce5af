"""Inter-chunk state passes (gka_spec.md §4 step A), serial over chunks, parallel over (D-tile, D-tile, b·h).

``chunk_states`` builds the entry state of every chunk from two token streams a, x:
    forward:  S_0 = init,  S_{c+1} = last_c·S_c + Σ_{σ∈c} exp(gc_last − gc_σ)·a_σ x_σᵀ
              (Gram: a = x = k; KV state: a = k, x = v)
    reverse:  R_{NC-1} = init,  R_{c-1} = last_c·R_c + scale·Σ_{τ∈c} exp(gc_τ)·a_τ x_τᵀ
              (readout gradient: a = q̃, x = do)
and ``scan_increments`` runs the same recurrence over increments that were computed elsewhere. The reverse pass may
mix its a-stream on the fly (``mix``: a = q + α·(x − q), the backward's q̃), so the fp32 q̃ is never written.
A pass of at least ``TWO_LEVEL_MIN_CHUNKS`` chunks runs in two levels: every chunk's increment in parallel, then
the serial recurrence as a multiply-add scan. The one-level loop is latency-bound on long chains (KERNEL_NOTES.md
v25, v26); ``GKA_TRITON_STATE_SCAN=1`` / ``=2`` force one level / two levels.
States are fp32; the per-chunk products are fp32-like (dots.py).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dots import _xdot


@triton.jit
def _chunk_update(cur, A, X, gl, scale, REVERSE: tl.constexpr, PREC: tl.constexpr, X_EXACT: tl.constexpr):
    """One chunk of the recurrence above: cur ← last·cur + Σ w_σ·a_σ x_σᵀ, w = exp(gc_last − gc) forward and
    scale·exp(gc) in reverse (A, X fp32 [C, ·] tiles, gl the chunk's log-decays)."""
    gc = tl.cumsum(gl, 0)
    glast = tl.sum(gl, 0)
    if REVERSE:
        w = tl.exp(gc) * scale
    else:
        w = tl.exp(glast - gc)
    return tl.exp(glast) * cur + _xdot(tl.trans(A * w[:, None]), X, False, X_EXACT, PREC)


@triton.jit
def _load_a(a_base, m_base, al_base, t, tm, ra, s_at, s_mt, s_alt, MIX: tl.constexpr):
    """The [C, ·] a-stream tile of tokens t (fp32); MIX: a + α·(m − a), the backward's q̃ from q, x and α."""
    A = tl.load(a_base + t[:, None] * s_at + ra[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
    if MIX:
        Mx = tl.load(m_base + t[:, None] * s_mt + ra[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
        al = tl.load(al_base + t * s_alt, mask=tm, other=0.0).to(tl.float32)
        A = A + al[:, None] * (Mx - A)
    return A


@triton.jit
def _states_tile(a_base, x_base, g_base, init_ptr, states_ptr, final_ptr, bh, ia, ix, T, NC, scale, s_at, s_xt, s_gt,
                 m_base, al_base, s_mt, s_alt,
                 DA: tl.constexpr, DX: tl.constexpr, C: tl.constexpr, BA: tl.constexpr, BX: tl.constexpr,
                 HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr,
                 X_EXACT: tl.constexpr, MIX: tl.constexpr):
    """One [BA, BX] tile of one (b, h)'s states, serial over the chunks. MIX: the a-stream is a + α·(m − a)."""
    ra = ia * BA + tl.arange(0, BA)
    rx = ix * BX + tl.arange(0, BX)
    rc = tl.arange(0, C)
    tile = ra[:, None] * DX + rx[None, :]
    if HAS_INIT:
        cur = tl.load(init_ptr + bh * DA * DX + tile).to(tl.float32)
    else:
        cur = tl.zeros([BA, BX], dtype=tl.float32)
    for step in range(NC):
        if REVERSE:
            c = NC - 1 - step
        else:
            c = step
        t = c * C + rc
        tm = t < T
        gl = tl.load(g_base + t * s_gt, mask=tm, other=0.0).to(tl.float32)
        A = _load_a(a_base, m_base, al_base, t, tm, ra, s_at, s_mt, s_alt, MIX)
        X = tl.load(x_base + t[:, None] * s_xt + rx[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
        tl.store(states_ptr + (bh * NC + c) * DA * DX + tile, cur)
        cur = _chunk_update(cur, A, X, gl, scale, REVERSE, PREC, X_EXACT)
    if STORE_FINAL:
        tl.store(final_ptr + bh * DA * DX + tile, cur)


@triton.jit
def _chunk_states_kernel(
        a_ptr, x_ptr, g_ptr, init_ptr, states_ptr, final_ptr,
        x2_ptr, init2_ptr, states2_ptr, final2_ptr, m_ptr, al_ptr,
        T, H, NC, scale,
        s_ab, s_at, s_ah,
        s_mb, s_mt, s_mh,
        s_alb, s_alt, s_alh,
        s_xb, s_xt, s_xh,
        s_x2b, s_x2t, s_x2h,
        s_gb, s_gt, s_gh,
        DA: tl.constexpr, DX: tl.constexpr, DX2: tl.constexpr, C: tl.constexpr, BA: tl.constexpr,
        BX: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr,
        PREC: tl.constexpr, X_EXACT: tl.constexpr, PAIR: tl.constexpr, MIX: tl.constexpr,
):
    """PAIR: the grid's last axis also covers a second stream x2 (same a and decays) with its own states, so the
    forward's Gram and KV passes run in one launch (programs ix ≥ DX / BX take x2). MIX: the a-stream mixed with
    m by the per-token weights al (``_states_tile``)."""
    bh = tl.program_id(0).to(tl.int64)   # b·h on the axis without the 65,535 limit
    ia = tl.program_id(1)
    ix = tl.program_id(2)
    b = bh // H
    h = bh % H
    a_base = a_ptr + b * s_ab + h * s_ah
    g_base = g_ptr + b * s_gb + h * s_gh
    m_base = m_ptr + b * s_mb + h * s_mh
    al_base = al_ptr + b * s_alb + h * s_alh
    if PAIR:
        if ix >= DX // BX:
            _states_tile(a_base, x2_ptr + b * s_x2b + h * s_x2h, g_base, init2_ptr, states2_ptr, final2_ptr, bh, ia,
                         ix - DX // BX, T, NC, scale, s_at, s_x2t, s_gt, m_base, al_base, s_mt, s_alt, DA, DX2, C,
                         BA, BX, HAS_INIT, STORE_FINAL, REVERSE, PREC, X_EXACT, MIX)
        else:
            _states_tile(a_base, x_ptr + b * s_xb + h * s_xh, g_base, init_ptr, states_ptr, final_ptr, bh, ia, ix,
                         T, NC, scale, s_at, s_xt, s_gt, m_base, al_base, s_mt, s_alt, DA, DX, C, BA, BX, HAS_INIT,
                         STORE_FINAL, REVERSE, PREC, X_EXACT, MIX)
    else:
        _states_tile(a_base, x_ptr + b * s_xb + h * s_xh, g_base, init_ptr, states_ptr, final_ptr, bh, ia, ix,
                     T, NC, scale, s_at, s_xt, s_gt, m_base, al_base, s_mt, s_alt, DA, DX, C, BA, BX, HAS_INIT,
                     STORE_FINAL, REVERSE, PREC, X_EXACT, MIX)


def _tile(d: int, bh: int) -> int:
    """D-tile of a state program. The pass is serial over chunks, so the tile sets the parallelism: with
    64-tiles at D = 64 only B·H programs run (96 at the 1024-px vision shape, on 132 SMs), so 32-tiles (4× the
    programs), and 16-tiles when even those would be fewer than 256 programs (one long sequence: B·H = 6 at
    T = 65,536 ran its forward in 6.8 ms instead of 7.6 on the H200; KERNEL_NOTES.md).
    ``GKA_TRITON_STATE_TILE`` overrides."""
    env = os.environ.get('GKA_TRITON_STATE_TILE')
    if env:
        return min(d, int(env))
    tile = min(d, 32)
    if bh * (d // tile) ** 2 < 256:
        tile = min(d, 16)
    return tile


def chunk_states(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor, init: Optional[torch.Tensor], chunk_size: int,
                 reverse: bool = False, scale: float = 1.0, want_final: bool = True, prec: str = 'ieee',
                 mix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """a [B, T, H, DA], x [B, T, H, DX] (unit stride on the last dim), g [B, T, H] log-decays.

    Returns the per-chunk states [B·H, NC, DA, DX] fp32 (entry states forward, exit states in reverse) and the
    state after the whole pass (the final state forward, the gradient w.r.t. the initial state in reverse).
    ``prec``: operand precision of the per-chunk dot ('ieee' exact fp32, 'tf32x3' fp32-like on tensor cores, 'bf16x3'
    for bf16 inputs: dots.py). ``mix`` = (m [B, T, H, DA] unit stride on the last dim, al [B, T, H]): the a-stream
    is a + al·(m − a), computed in fp32 as it is loaded (the backward's q̃ = q + α·(x − q) without an fp32 copy)."""
    return _launch(a, [(x, init)], g, chunk_size, reverse, scale, want_final, prec, mix)[0]


def gram_and_kv_states(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor],
                       u0: Optional[torch.Tensor], chunk_size: int, want_final: bool = True, prec: str = 'ieee'):
    """The forward's two passes, ``chunk_states(k, k, …, h0)`` and ``chunk_states(k, v, …, u0)``: one launch whose
    programs cover both (the passes are serial over chunks, so twice the programs run them side by side: 2-4 % off
    gka_chunk's fwd+bwd and 2 % off gka_small's training step at 1024 px on the H200, KERNEL_NOTES.md v11), or two
    launches with ``GKA_TRITON_STATE_PAIR=0``. The same arithmetic per program either way, so the states are the
    same bit for bit. h0 and u0 are both given or both None. Returns ((H0s, HT), (U0s, UT))."""
    if os.environ.get('GKA_TRITON_STATE_PAIR', '1') != '0' and k.dtype == v.dtype and (h0 is None) == (u0 is None):
        return tuple(_launch(k, [(k, h0), (v, u0)], g, chunk_size, False, 1.0, want_final, prec))
    return (chunk_states(k, k, g, h0, chunk_size, want_final=want_final, prec=prec),
            chunk_states(k, v, g, u0, chunk_size, want_final=want_final, prec=prec))


def _strides(*tensors) -> Tuple[int, ...]:
    """The (b, t, h) strides of [B, T, H, ·] / [B, T, H] tensors, flattened: the kernels' s_*b, s_*t, s_*h arguments."""
    return tuple(st for ten in tensors for st in ten.stride()[:3])


# Where the two-level pass is the faster one, measured on the H200 (KERNEL_NOTES.md v26). D = DV = 64: at 171 and
# 683 chunks the forward took 0.88x / 0.74x the one-level time (B4 T16384, B1 T65536; gka_small's inference at
# 2048 px 0.87x), at 43 and 4 chunks 1.03x / 1.045x (B16 T4096, B256 T196: many short chains fill the GPU with one
# level, and the increments' extra write and read cost more than the serial steps save). D = 128 states are 4x the
# bytes per chunk: at 64 chunks (B4 T4096 H16) two levels took 1.03x, so they keep one level.
TWO_LEVEL_MIN_CHUNKS = 64
TWO_LEVEL_MAX_STATE = 64 * 64


def _two_level(NC: int, state_size: int) -> bool:
    """Whether a pass over NC chunks of [DA, DX] states (state_size = DA·DX) runs in two levels
    (``GKA_TRITON_STATE_SCAN``: 1 never, 2 always, unset: from ``TWO_LEVEL_MIN_CHUNKS`` chunks of states up to
    ``TWO_LEVEL_MAX_STATE`` elements)."""
    env = os.environ.get('GKA_TRITON_STATE_SCAN', '')
    if env not in ('', '1', '2'):
        raise ValueError(f'GKA_TRITON_STATE_SCAN must be 1 (one level) or 2 (two levels), got {env!r}')
    if NC == 0:
        return False
    return env == '2' or (env == '' and NC >= TWO_LEVEL_MIN_CHUNKS and state_size <= TWO_LEVEL_MAX_STATE)


def _launch(a, streams, g, chunk_size, reverse, scale, want_final, prec, mix=None):
    """One launch of the state pass over one or two (x, init) streams sharing a and g (a mixed as ``chunk_states``
    says when mix is given), in two levels (``_launch_two_level``) where ``_two_level`` says so."""
    B, T, H, DA = a.shape
    NC = triton.cdiv(T, chunk_size)
    if _two_level(NC, DA * max(x.shape[-1] for x, _ in streams)):
        return _launch_two_level(a, streams, g, chunk_size, reverse, scale, want_final, prec, mix)
    outs, inits = [], []
    for x, init in streams:
        DX = x.shape[-1]
        states = torch.empty(B * H, max(NC, 1), DA, DX, device=a.device, dtype=torch.float32)
        final = torch.empty(B * H, DA, DX, device=a.device, dtype=torch.float32) if want_final else states
        outs.append((states, final))
        inits.append(init.to(torch.float32).reshape(B * H, DA, DX).contiguous() if init is not None else states)
    (x, init), (states, final) = streams[0], outs[0]
    (x2, _), (states2, final2) = streams[-1], outs[-1]
    BA = _tile(DA, B * H)
    BX = min(_tile(x.shape[-1], B * H), _tile(x2.shape[-1], B * H))
    pair = len(streams) == 2
    nx = x.shape[-1] // BX + (x2.shape[-1] // BX if pair else 0)
    m, al = mix if mix is not None else (a, g)   # placeholders when not mixing (MIX=False reads neither)
    _chunk_states_kernel[(B * H, DA // BA, nx)](
        a, x, g, inits[0], states, final, x2, inits[-1], states2, final2, m, al,
        T, H, NC, float(scale), *_strides(a, m, al, x, x2, g),
        DA=DA, DX=x.shape[-1], DX2=x2.shape[-1], C=chunk_size, BA=BA, BX=BX,
        HAS_INIT=init is not None, STORE_FINAL=want_final, REVERSE=reverse, PREC=prec,
        X_EXACT=x.dtype == torch.bfloat16, PAIR=pair, MIX=mix is not None,
        num_warps=4,
    )
    return [(st, fi if want_final else None) for st, fi in outs]


@triton.jit
def _store_increment(A, x_base, s_xt, gl, inc_ptr, bh, c, t, tm, NC, scale, DA: tl.constexpr, DX: tl.constexpr,
                     REVERSE: tl.constexpr, PREC: tl.constexpr, X_EXACT: tl.constexpr):
    """Chunk c's own increment Σ w_σ·a_σ x_σᵀ (``_chunk_update`` from a zero state) into its [DA, DX] slot."""
    rx = tl.arange(0, DX)
    X = tl.load(x_base + t[:, None] * s_xt + rx[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
    inc = _chunk_update(tl.zeros([DA, DX], dtype=tl.float32), A, X, gl, scale, REVERSE, PREC, X_EXACT)
    tl.store(inc_ptr + (bh * NC + c) * DA * DX + tl.arange(0, DA)[:, None] * DX + rx[None, :], inc)


@triton.jit
def _chunk_increments_kernel(
        a_ptr, x_ptr, x2_ptr, g_ptr, m_ptr, al_ptr, inc_ptr, inc2_ptr, last_ptr,
        T, H, NC, scale,
        s_ab, s_at, s_ah,
        s_mb, s_mt, s_mh,
        s_alb, s_alt, s_alh,
        s_xb, s_xt, s_xh,
        s_x2b, s_x2t, s_x2h,
        s_gb, s_gt, s_gh,
        DA: tl.constexpr, DX: tl.constexpr, DX2: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr,
        PREC: tl.constexpr, X_EXACT: tl.constexpr, PAIR: tl.constexpr, MIX: tl.constexpr,
):
    """Level one of the two-level state pass: every chunk's own increment Σ w_σ·a_σ x_σᵀ (``_chunk_update`` from a
    zero state), one program per (b·h, chunk, stream), all in parallel; the chunk's decay exp(Σ g) into last."""
    bh = tl.program_id(0).to(tl.int64)   # b·h on the axis without the 65,535 limit
    c = tl.program_id(1)
    which = tl.program_id(2)
    b = bh // H
    h = bh % H
    t = c * C + tl.arange(0, C)
    tm = t < T
    gl = tl.load(g_ptr + b * s_gb + h * s_gh + t * s_gt, mask=tm, other=0.0).to(tl.float32)
    A = _load_a(a_ptr + b * s_ab + h * s_ah, m_ptr + b * s_mb + h * s_mh, al_ptr + b * s_alb + h * s_alh, t, tm,
                tl.arange(0, DA), s_at, s_mt, s_alt, MIX)
    if which == 0:
        _store_increment(A, x_ptr + b * s_xb + h * s_xh, s_xt, gl, inc_ptr, bh, c, t, tm, NC, scale, DA, DX,
                         REVERSE, PREC, X_EXACT)
        tl.store(last_ptr + bh * NC + c, tl.exp(tl.sum(gl, 0)))
    else:
        _store_increment(A, x2_ptr + b * s_x2b + h * s_x2h, s_x2t, gl, inc2_ptr, bh, c, t, tm, NC, scale, DA, DX2,
                         REVERSE, PREC, X_EXACT)


def _scan_block(bh: int, size: int) -> int:
    """Elements per program of the two-level pass's serial scan: 1,024, halved down to 128 while fewer than 512
    programs would run (long sequences with few b·h are the latency-bound case)."""
    block = min(size, 1024)
    while block > 128 and bh * (size // block) < 512:
        block //= 2
    return block


def _scan_pair() -> bool:
    """Whether the two-level pass scans a pair of streams in one launch (``GKA_TRITON_SCAN_PAIR``: 1, the default,
    or 0: a launch per stream)."""
    env = os.environ.get('GKA_TRITON_SCAN_PAIR', '1')
    if env not in ('0', '1'):
        raise ValueError(f'GKA_TRITON_SCAN_PAIR must be 1 (one scan launch for both streams) or 0 (one each), '
                         f'got {env!r}')
    return env == '1'


def _launch_two_level(a, streams, g, chunk_size, reverse, scale, want_final, prec, mix=None):
    """``_launch`` in two levels: the chunks' increments in one parallel launch, written where their states go, then
    the serial recurrence in place (``scan_increments``), whose step is one multiply-add per element instead of a
    chunk's loads and products. Same results up to the order of fp32 rounding."""
    B, T, H, DA = a.shape
    NC = triton.cdiv(T, chunk_size)   # T > 0: _two_level is False otherwise
    f32 = torch.float32
    pair = len(streams) == 2
    (x, init), (x2, init2) = streams[0], streams[-1]
    DX = x.shape[-1]
    # Both streams' scans in one launch when their states have one shape (GKA_TRITON_SCAN_PAIR=0: one launch
    # each). With few b·h the scan is serial over chunks and latency-bound, so two launches take about twice one's
    # time: 0.93x / 0.92x the forward at B4 T16384 / B1 T65536 on an H100; gka_small at 2048 px (48 b·h, segments
    # of ~86 chunks) moves the increments at about the memory bandwidth already and gained nothing (KERNEL_NOTES.md
    # v26-v27)
    joint = pair and x2.shape[-1] == DX and _scan_pair()
    if joint:
        both = torch.empty(2, B * H, NC, DA, DX, device=a.device, dtype=f32)
        incs = [both[0], both[1]]
    else:
        incs = [torch.empty(B * H, NC, DA, xs.shape[-1], device=a.device, dtype=f32) for xs, _ in streams]
    last = torch.empty(B * H, NC, device=a.device, dtype=f32)
    m, al = mix if mix is not None else (a, g)   # placeholders when not mixing (MIX=False reads neither)
    _chunk_increments_kernel[(B * H, NC, 2 if pair else 1)](
        a, x, x2, g, m, al, incs[0], incs[-1], last,
        T, H, NC, float(scale), *_strides(a, m, al, x, x2, g),
        DA=DA, DX=x.shape[-1], DX2=x2.shape[-1], C=chunk_size, REVERSE=reverse, PREC=prec,
        X_EXACT=x.dtype == torch.bfloat16, PAIR=pair, MIX=mix is not None,
        num_warps=4,
    )
    if joint:   # the pair path gives both initial states or neither
        inits = torch.stack([i.to(f32).reshape(B * H, DA, DX) for i in (init, init2)]) if init is not None else None
        flat = both.view(2 * B * H, NC, DA, DX)
        states, final = scan_increments(flat, last, inits, reverse, out=flat, block=_scan_block(B * H, DA * DX))
        states, final = states.view(2, B * H, NC, DA, DX), final.view(2, B * H, DA, DX)
        return [(states[i], final[i] if want_final else None) for i in range(2)]
    outs = []
    for inc, (_, ini) in zip(incs, streams):
        states, final = scan_increments(inc, last, ini, reverse, out=inc,
                                        block=_scan_block(B * H, DA * inc.shape[-1]))
        outs.append((states, final if want_final else None))
    return outs


@triton.jit
def _scan_step(cur, inc_ptr, last_ptr, out_ptr, bh, lrow, step, offs, NC, SIZE: tl.constexpr,
               REVERSE: tl.constexpr):
    if REVERSE:
        c = NC - 1 - step
    else:
        c = step
    base = (bh * NC + c) * SIZE + offs
    inc = tl.load(inc_ptr + base)    # before the store: out may be inc itself (the two-level state pass)
    tl.store(out_ptr + base, cur)
    return tl.load(last_ptr + lrow * NC + c) * cur + inc


@triton.jit
def _scan_increments_kernel(
        inc_ptr, last_ptr, init_ptr, out_ptr, final_ptr, NC, NL,
        SIZE: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
        STAGES: tl.constexpr = 1,
):
    bh = tl.program_id(0).to(tl.int64)
    lrow = bh % NL                       # the decays' row: several streams stacked on bh share them
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    if HAS_INIT:
        cur = tl.load(init_ptr + bh * SIZE + offs).to(tl.float32)
    else:
        cur = tl.zeros([BLOCK], dtype=tl.float32)
    if STAGES > 1:
        for step in tl.range(NC, num_stages=STAGES):
            cur = _scan_step(cur, inc_ptr, last_ptr, out_ptr, bh, lrow, step, offs, NC, SIZE, REVERSE)
    else:
        for step in range(NC):
            cur = _scan_step(cur, inc_ptr, last_ptr, out_ptr, bh, lrow, step, offs, NC, SIZE, REVERSE)
    tl.store(final_ptr + bh * SIZE + offs, cur)


def scan_increments(inc: torch.Tensor, last: torch.Tensor, init: Optional[torch.Tensor], reverse: bool,
                    out: Optional[torch.Tensor] = None, block: Optional[int] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """inc [BH, NC, D1, D2] fp32 contiguous, last [NL, NC] with BH a multiple of NL (row bh decays by last[bh % NL]:
    streams stacked on the first axis share their decays): the recurrence of ``chunk_states`` over given
    increments. Returns the per-chunk states (into ``out``, which may be inc itself) and the state after the pass.
    ``block``: elements per program (default min(D1·D2, 1024)); the pass is serial over chunks, so smaller blocks
    give more programs."""
    BH, NC, D1, D2 = inc.shape
    NL = last.shape[0]
    if last.shape[1] != NC or BH % NL:
        raise ValueError(f'scan_increments: last must be [NL, {NC}] with NL dividing {BH}, got {list(last.shape)}')
    size = D1 * D2
    out = torch.empty_like(inc) if out is None else out
    final = torch.empty(BH, D1, D2, device=inc.device, dtype=torch.float32)
    if init is not None:
        init = init.to(torch.float32).reshape(BH, D1, D2).contiguous()
    block = min(size, block or 1024)
    _scan_increments_kernel[(BH, size // block)](
        inc, last.contiguous(), init if init is not None else inc, out, final, NC, NL,
        SIZE=size, BLOCK=block, HAS_INIT=init is not None, REVERSE=reverse, STAGES=_scan_stages(NC), num_warps=4)
    return out, final


# The scan's pipeline depth by chain length, measured interleaved on an H100 (KERNEL_NOTES.md v27): 8 stages took
# 0.891x / 0.973x the fwd+bwd time of 4 at B1 T65536 / B4 T16384 (4,096 / 1,024 chunks in the backward's scan),
# 0.998x at B16 T4096 (256) and 1.008x at B256 T196 (13 chunks: a deeper prologue than the loop). 64 lies between
# the measured 13 and 256, the same bound as the two-level pass's
DEEP_SCAN_MIN_CHUNKS = 64


def _scan_stages(NC: int) -> int:
    """Software-pipeline depth of the scan's loop over NC chunks (``GKA_TRITON_SCAN_STAGES`` sets it; default 8
    from ``DEEP_SCAN_MIN_CHUNKS`` chunks, 4 below; 1: the plain loop). Its step is one load, one multiply-add and one
    store per element; unpipelined, each step waits for its load (~1.2 µs per step on the H100), while the
    increments of later steps do not depend on the carry. The sm_90 compile puts the loads on cp.async from 2
    stages; 4 stages took 0.965x / 0.926x the fwd+bwd time of 1 at B4 T16384 / B1 T65536 on the H200, the same at
    B256 T196 and B16 T4096, and the two-level pass needs it (KERNEL_NOTES.md v26)."""
    env = os.environ.get('GKA_TRITON_SCAN_STAGES')
    if env is None:
        return 8 if NC >= DEEP_SCAN_MIN_CHUNKS else 4
    stages = int(env)
    if stages < 1:
        raise ValueError(f'GKA_TRITON_SCAN_STAGES must be a positive integer, got {stages}')
    return stages
