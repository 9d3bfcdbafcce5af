"""The mixer's input glue as one Triton kernel each way: SiLU of the conv output, L2 normalisation of q and k,
β scaling of k and v, and the gather of every scan direction, from the row-major conv output to the stacked
[B·n, L, H, D] q, k, v the GKA kernel takes.

In PyTorch this is a SiLU, a norm, an index_select of the three streams per direction and three scaling multiplies;
here a program reads one token block and head of the conv output and writes its three outputs once. The backward
gathers each token's n direction gradients through the inverse permutation (no atomics) and also returns ∂β.

The default on CUDA (with ``merge_norm``; ``GKA_FUSED_GLUE=0`` opts out); the tests check it against the PyTorch
path under ``TRITON_INTERPRET=1`` and on the GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .rebuild import rebuilt_in_backward

try:
    import triton
    import triton.language as tl
except ImportError:  # gka_vision runs without triton; the fused path is then never enabled
    triton = None

__all__ = ['scan_qkv', 'conv_scan_qkv', 'rebuild_qkv_in_backward']

_BT = 32

if triton is not None:
    @triton.jit
    def _fwd(raw_ptr, perm_ptr, beta_ptr, q_ptr, k_ptr, v_ptr, L, H, NDIR, eps,
             D: tl.constexpr, BT: tl.constexpr, HAS_PERM: tl.constexpr):
        bj = tl.program_id(0).to(tl.int64)      # b·n + j: the stacked sequence this program writes
        ps = tl.program_id(1)
        h = tl.program_id(2)
        b = bj // NDIR
        j = bj % NDIR
        s = ps * BT + tl.arange(0, BT)          # scan positions
        sm = s < L
        rd = tl.arange(0, D)
        HD = H * D
        if HAS_PERM:
            p = tl.load(perm_ptr + j * L + s, mask=sm, other=0).to(tl.int64)
        else:
            p = s.to(tl.int64)
        src = raw_ptr + ((b * L + p) * 3 * HD + h * D)[:, None] + rd[None, :]
        xq = tl.load(src, mask=sm[:, None], other=0.0).to(tl.float32)
        xk = tl.load(src + HD, mask=sm[:, None], other=0.0).to(tl.float32)
        xv = tl.load(src + 2 * HD, mask=sm[:, None], other=0.0).to(tl.float32)
        aq = xq * tl.sigmoid(xq)
        ak = xk * tl.sigmoid(xk)
        av = xv * tl.sigmoid(xv)
        rq = 1.0 / (tl.sqrt(tl.sum(aq * aq, 1)) + eps)
        rk = 1.0 / (tl.sqrt(tl.sum(ak * ak, 1)) + eps)
        beta = tl.load(beta_ptr + (bj * L + s) * H + h, mask=sm, other=0.0).to(tl.float32)
        dst = ((bj * L + s) * HD + h * D)[:, None] + rd[None, :]
        tl.store(q_ptr + dst, (aq * rq[:, None]).to(q_ptr.dtype.element_ty), mask=sm[:, None])
        tl.store(k_ptr + dst, (ak * (rk * beta)[:, None]).to(k_ptr.dtype.element_ty), mask=sm[:, None])
        tl.store(v_ptr + dst, (av * beta[:, None]).to(v_ptr.dtype.element_ty), mask=sm[:, None])

    @triton.jit
    def _bwd(raw_ptr, inv_ptr, beta_ptr, dq_ptr, dk_ptr, dv_ptr, draw_ptr, dbeta_ptr, L, H, NDIR, eps,
             D: tl.constexpr, BT: tl.constexpr, HAS_PERM: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        pp = tl.program_id(1)
        h = tl.program_id(2)
        p = pp * BT + tl.arange(0, BT)          # row-major tokens
        pm = p < L
        rd = tl.arange(0, D)
        HD = H * D
        src = ((b * L + p) * 3 * HD + h * D)[:, None] + rd[None, :]
        xq = tl.load(raw_ptr + src, mask=pm[:, None], other=0.0).to(tl.float32)
        xk = tl.load(raw_ptr + src + HD, mask=pm[:, None], other=0.0).to(tl.float32)
        xv = tl.load(raw_ptr + src + 2 * HD, mask=pm[:, None], other=0.0).to(tl.float32)
        sq = tl.sigmoid(xq)
        sk = tl.sigmoid(xk)
        sv = tl.sigmoid(xv)
        aq = xq * sq
        ak = xk * sk
        av = xv * sv
        nq = tl.sqrt(tl.sum(aq * aq, 1))
        nk = tl.sqrt(tl.sum(ak * ak, 1))
        rq = 1.0 / (nq + eps)
        rk = 1.0 / (nk + eps)
        gq = tl.zeros([BT, D], dtype=tl.float32)   # ∂ of the normalised q, summed over directions
        gk = tl.zeros([BT, D], dtype=tl.float32)   # ∂ of the normalised k, β applied
        gv = tl.zeros([BT, D], dtype=tl.float32)   # ∂ of SiLU(v)
        for j in range(NDIR):
            if HAS_PERM:
                s = tl.load(inv_ptr + j * L + p, mask=pm, other=0).to(tl.int64)
            else:
                s = p
            row = (b * NDIR + j) * L + s
            off = (row * HD + h * D)[:, None] + rd[None, :]
            dq = tl.load(dq_ptr + off, mask=pm[:, None], other=0.0).to(tl.float32)
            dk = tl.load(dk_ptr + off, mask=pm[:, None], other=0.0).to(tl.float32)
            dv = tl.load(dv_ptr + off, mask=pm[:, None], other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + row * H + h, mask=pm, other=0.0).to(tl.float32)
            gq += dq
            gk += beta[:, None] * dk
            gv += beta[:, None] * dv
            dbeta = rk * tl.sum(ak * dk, 1) + tl.sum(av * dv, 1)
            tl.store(dbeta_ptr + row * H + h, dbeta.to(dbeta_ptr.dtype.element_ty), mask=pm)
        # q̂ = a / (‖a‖ + eps): ∂a = r ∂q̂ − a r² (a·∂q̂) / ‖a‖ (zero where a = 0)
        daq = rq[:, None] * gq - aq * (rq * rq * tl.sum(aq * gq, 1) / tl.maximum(nq, 1e-30))[:, None]
        dak = rk[:, None] * gk - ak * (rk * rk * tl.sum(ak * gk, 1) / tl.maximum(nk, 1e-30))[:, None]
        tl.store(draw_ptr + src, (daq * sq * (1.0 + xq * (1.0 - sq))).to(draw_ptr.dtype.element_ty),
                 mask=pm[:, None])
        tl.store(draw_ptr + src + HD, (dak * sk * (1.0 + xk * (1.0 - sk))).to(draw_ptr.dtype.element_ty),
                 mask=pm[:, None])
        tl.store(draw_ptr + src + 2 * HD, (gv * sv * (1.0 + xv * (1.0 - sv))).to(draw_ptr.dtype.element_ty),
                 mask=pm[:, None])


def _scan_fwd(raw, perm, beta, ndir: int, head_dim: int, eps: float):
    B, L, C3 = raw.shape
    H = C3 // 3 // head_dim
    q, k, v = (raw.new_empty(B * ndir, L, H, head_dim) for _ in range(3))
    grid = (B * ndir, -(-L // _BT), H)   # the batch on axis 0, which has no 65,535 limit
    _fwd[grid](raw, perm if perm is not None else raw, beta, q, k, v, L, H, ndir, float(eps),
               D=head_dim, BT=_BT, HAS_PERM=perm is not None)
    return q, k, v


def _scan_bwd(raw, inv, beta, dq, dk, dv, ndir: int, head_dim: int, eps: float):
    B, L, C3 = raw.shape
    H = C3 // 3 // head_dim
    grads = [t.contiguous() if t is not None else raw.new_zeros(B * ndir, L, H, head_dim) for t in (dq, dk, dv)]
    draw = torch.empty_like(raw)
    dbeta = torch.empty_like(beta)
    grid = (B, -(-L // _BT), H)
    _bwd[grid](raw, inv if inv is not None else raw, beta, *grads, draw, dbeta, L, H, ndir, float(eps),
               D=head_dim, BT=_BT, HAS_PERM=inv is not None)
    return draw, dbeta


class _ScanQKV(torch.autograd.Function):

    @staticmethod
    def forward(ctx, raw, perm, inv, beta, ndir: int, head_dim: int, eps: float):
        ctx.save_for_backward(raw, inv, beta)
        ctx.cfg = (ndir, head_dim, eps)
        return _scan_fwd(raw, perm, beta, ndir, head_dim, eps)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        raw, inv, beta = ctx.saved_tensors
        draw, dbeta = _scan_bwd(raw, inv, beta, dq, dk, dv, *ctx.cfg)
        return draw, None, None, dbeta, None, None, None


def _conv_rows(y, weight, padding: int):
    """The depthwise conv of the mixer on y [B, C3, Hg, Wg] as row-major tokens [B, L, C3] (a view when the conv
    output is channels-last, as it is for y a permuted NHWC projection)."""
    out = torch.nn.functional.conv2d(y, weight, None, 1, padding, 1, weight.shape[0])
    B, C3, Hg, Wg = out.shape
    return out.permute(0, 2, 3, 1).reshape(B, Hg * Wg, C3)


class _ConvScanQKV(torch.autograd.Function):
    """The depthwise conv and scan_qkv as one autograd node that saves the conv's input but not its output: the
    backward recomputes the conv (cheap: 9 multiply-adds per element) instead of keeping a [B, L, 3·H·D] tensor per
    block until then (7 % of gka_small's training activation peak, KERNEL_NOTES.md v14)."""

    @staticmethod
    def forward(ctx, y, weight, perm, inv, beta, ndir: int, head_dim: int, eps: float, padding: int):
        # the recomputation in the backward must see the autocast state the forward ran under
        dev = y.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        raw = _conv_rows(y, weight, padding).contiguous()
        ctx.save_for_backward(y, weight, inv, beta)
        ctx.cfg = (ndir, head_dim, eps, padding)
        return _scan_fwd(raw, perm, beta, ndir, head_dim, eps)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        y, weight, inv, beta = ctx.saved_tensors
        ndir, head_dim, eps, padding = ctx.cfg
        dev, amp, amp_dtype = ctx.amp
        need_y, need_w = ctx.needs_input_grad[:2]
        with torch.enable_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=amp):
            y_ = y.detach().requires_grad_(need_y)
            w_ = weight.detach().requires_grad_(need_w)
            raw = _conv_rows(y_, w_, padding)
        draw, dbeta = _scan_bwd(raw.detach().contiguous(), inv, beta, dq, dk, dv, ndir, head_dim, eps)
        wrt = [t for t, need in ((y_, need_y), (w_, need_w)) if need]
        grads = iter(torch.autograd.grad(raw, wrt, draw.view(raw.shape)) if wrt else ())
        dy = next(grads) if need_y else None
        dw = next(grads) if need_w else None
        return dy, dw, None, None, dbeta, None, None, None, None


@torch.compiler.disable  # opaque to dynamo, like the GKA kernel call
def scan_qkv(raw: torch.Tensor, perm: Optional[torch.Tensor], inv: Optional[torch.Tensor], beta: torch.Tensor,
             ndir: int, head_dim: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B·n, L, H, D] in scan order from the pre-SiLU conv output ``raw`` [B, L, 3·H·D] (row-major tokens,
    streams q|k|v): q = ŝ(q), k = ŝ(k)·β, v = SiLU(v)·β with ŝ(x) = SiLU(x) / (‖SiLU(x)‖ + eps) per head.

    perm / inv: [n, L] scan step → row-major token and back (None for the row-major identity); beta: [B·n, L, H]
    in scan order."""
    if not raw.is_contiguous():
        raise ValueError('scan_qkv takes contiguous raw and beta')
    B, L, C3 = raw.shape
    _check_beta('scan_qkv', 'raw', raw, beta, B, L, C3, ndir, head_dim)
    return _ScanQKV.apply(raw, perm, inv, beta, ndir, head_dim, eps)


def _check_beta(fn: str, name: str, t: torch.Tensor, beta: torch.Tensor, B: int, L: int, C3: int, ndir: int,
                head_dim: int) -> None:
    """beta must be contiguous [B·n, L, H] for the B·L tokens of 3·H·D channels the glue reads from ``t``."""
    if not beta.is_contiguous():
        raise ValueError(f'{fn} takes contiguous {name} and beta')
    if C3 % (3 * head_dim) or beta.shape != (B * ndir, L, C3 // 3 // head_dim):
        raise ValueError(f'{fn}: {name} {list(t.shape)} and beta {list(beta.shape)} do not match n = {ndir}, '
                         f'head_dim = {head_dim}')


@torch.compiler.disable
def conv_scan_qkv(y: torch.Tensor, conv: torch.nn.Conv2d, perm: Optional[torch.Tensor], inv: Optional[torch.Tensor],
                  beta: torch.Tensor, ndir: int, head_dim: int,
                  eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scan_qkv(conv(y) as row-major tokens, …)`` for training: y [B, 3·H·D, Hg, Wg] is the projection the mixer's
    depthwise ``conv`` (no bias, same-size padding, one group per channel) reads; the conv's output is recomputed in
    the backward instead of being saved."""
    C3 = y.shape[1]
    if conv.bias is not None or conv.groups != C3 or conv.stride != (1, 1) or conv.dilation != (1, 1) \
            or conv.padding != (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2):
        raise ValueError('conv_scan_qkv takes a same-size depthwise conv without bias')
    _check_beta('conv_scan_qkv', 'y', y, beta, y.shape[0], y.shape[2] * y.shape[3], C3, ndir, head_dim)
    return _ConvScanQKV.apply(y, conv.weight, perm, inv, beta, ndir, head_dim, eps, conv.padding[0])


def rebuild_qkv_in_backward(q, k, v, y, conv: torch.nn.Conv2d, perm, beta, ndir: int, head_dim: int, eps: float):
    """A context inside which autograd saves ``conv_scan_qkv``'s outputs q, k, v (as the GKA kernel saves its
    inputs) as a recipe: the backward rebuilds all three once from the projection y and β, which the conv_scan_qkv
    node keeps anyway, with the forward's kernels, so bit for bit (``rebuild.rebuilt_in_backward``). Three
    [B·n, L, H, D] tensors per block are then not kept from the forward to the backward (KERNEL_NOTES.md, v17);
    the price is one more conv and glue kernel per block in the backward."""
    weight, padding = conv.weight, conv.padding[0]

    def recipe():
        return _scan_fwd(_conv_rows(y, weight, padding).contiguous(), perm, beta, ndir, head_dim, eps)

    return rebuilt_in_backward((q, k, v), recipe, y.device.type)
