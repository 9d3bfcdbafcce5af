"""The mixer's output glue as one Triton kernel each way: the sum of the scan directions' outputs back in row-major
order, then the gated RMSNorm (``GatedRMSNorm``).

In PyTorch this is an index_select, a sum and five fp32 elementwise passes over [B, L, H·D] (a third of the glue
time of gka_small on the H200, benchmarks/KERNEL_NOTES.md); here one program reads the n direction rows of a token
block and head once and writes y once. The backward recomputes the sum and writes each direction's gradient row to
the position it came from (the scatter index is a permutation, so no row is written twice).

The default on CUDA (``GKA_FUSED_GLUE=0`` opts out); the tests check it against the PyTorch path under
``TRITON_INTERPRET=1`` and on the GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ['merge_norm', 'fused_glue_supported']

try:
    import triton
    import triton.language as tl
except ImportError:  # gka_vision runs without triton (CPU, non-Linux); the fused path is then never enabled
    triton = None


def fused_glue_supported(t: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused glue kernels (here and in scan_qkv.py) can run for a tensor on this device and head dim."""
    if triton is None or head_dim < 16 or head_dim & (head_dim - 1):   # a power-of-two tile per head
        return False
    return t.is_cuda or os.environ.get('TRITON_INTERPRET') == '1'


if triton is not None:
    @triton.jit
    def _dir_rows(idx_ptr, j, b, p, pm, L, NDIR: tl.constexpr, HAS_IDX: tl.constexpr):
        """Rows of [B·n·L] holding direction j's output for the row-major tokens p of image b."""
        if HAS_IDX:
            src = tl.load(idx_ptr + j * L + p, mask=pm, other=0).to(tl.int64)
        else:
            src = (j * L + p).to(tl.int64)
        return b * NDIR * L + src

    @triton.jit
    def _dir_sum(o_ptr, idx_ptr, b, p, pm, h, L, HD, D: tl.constexpr, NDIR: tl.constexpr, BT: tl.constexpr,
                 HAS_IDX: tl.constexpr):
        """Σ_j of the directions' outputs for tokens p, head h, in fp32 [BT, D]."""
        rd = tl.arange(0, D)
        s = tl.zeros([BT, D], dtype=tl.float32)
        for j in tl.static_range(NDIR):
            rows = _dir_rows(idx_ptr, j, b, p, pm, L, NDIR, HAS_IDX)
            s += tl.load(o_ptr + rows[:, None] * HD + h * D + rd[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        return s

    @triton.jit
    def _head_tile(o_ptr, idx_ptr, z_ptr, w_ptr, L, H, D: tl.constexpr, NDIR: tl.constexpr, BT: tl.constexpr,
                   HAS_IDX: tl.constexpr):
        """What both directions of the kernel start from, for this program's tokens and head: the directions'
        summed output s, the gate z and the norm weight w (fp32), and the tile's indices."""
        b = tl.program_id(0).to(tl.int64)
        pt = tl.program_id(1)
        h = tl.program_id(2)
        p = pt * BT + tl.arange(0, BT)
        pm = p < L
        rd = tl.arange(0, D)
        HD = H * D
        s = _dir_sum(o_ptr, idx_ptr, b, p, pm, h, L, HD, D, NDIR, BT, HAS_IDX)
        tok = b * L + p
        zz = tl.load(z_ptr + tok[:, None] * HD + h * D + rd[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rd).to(tl.float32)
        return b, pt, h, p, pm, rd, HD, tok, s, zz, w

    @triton.jit
    def _fwd(o_ptr, idx_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, L, H, eps,
             D: tl.constexpr, NDIR: tl.constexpr, BT: tl.constexpr, HAS_IDX: tl.constexpr):
        b, pt, h, p, pm, rd, HD, tok, s, zz, w = _head_tile(o_ptr, idx_ptr, z_ptr, w_ptr, L, H, D, NDIR, BT, HAS_IDX)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, 1) / D + eps)
        y = s * rstd[:, None] * w[None, :] * (zz * tl.sigmoid(zz))
        tl.store(y_ptr + tok[:, None] * HD + h * D + rd[None, :], y.to(y_ptr.dtype.element_ty), mask=pm[:, None])
        tl.store(rstd_ptr + tok * H + h, rstd, mask=pm)

    @triton.jit
    def _bwd(o_ptr, idx_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, do_ptr, dz_ptr, dw_ptr, L, H,
             D: tl.constexpr, NDIR: tl.constexpr, BT: tl.constexpr, HAS_IDX: tl.constexpr):
        b, pt, h, p, pm, rd, HD, tok, s, zz, w = _head_tile(o_ptr, idx_ptr, z_ptr, w_ptr, L, H, D, NDIR, BT, HAS_IDX)
        rstd = tl.load(rstd_ptr + tok * H + h, mask=pm, other=0.0)
        dy = tl.load(dy_ptr + tok[:, None] * HD + h * D + rd[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        xhat = s * rstd[:, None]
        sig = tl.sigmoid(zz)
        a = xhat * w[None, :]
        dz = dy * a * sig * (1.0 + zz * (1.0 - sig))
        tl.store(dz_ptr + tok[:, None] * HD + h * D + rd[None, :], dz.to(dz_ptr.dtype.element_ty), mask=pm[:, None])
        dxhat = dy * (zz * sig) * w[None, :]
        # per-program partial of the weight gradient; summed over programs on the host
        pid = (b * H + h) * tl.num_programs(1) + pt
        tl.store(dw_ptr + pid * D + rd, tl.sum(dy * (zz * sig) * xhat, 0))
        ds = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, 1) / D)[:, None])
        for j in tl.static_range(NDIR):
            rows = _dir_rows(idx_ptr, j, b, p, pm, L, NDIR, HAS_IDX)
            tl.store(do_ptr + rows[:, None] * HD + h * D + rd[None, :], ds.to(do_ptr.dtype.element_ty),
                     mask=pm[:, None])

_BT = 32


def merge_norm_fwd(o, idx, z, weight, ndir: int, head_dim: int, eps: float):
    """The forward launch: y like z, and the per-token, per-head 1/rms [B, L, H] (fp32) the backward reads."""
    B, nL, HD = o.shape
    L, H = nL // ndir, HD // head_dim
    y = torch.empty_like(z)
    rstd = torch.empty(B, L, H, device=o.device, dtype=torch.float32)
    grid = (B, -(-L // _BT), H)   # the batch on axis 0, which has no 65,535 limit
    _fwd[grid](o, idx if idx is not None else o, z, weight, y, rstd, L, H, float(eps),
              D=head_dim, NDIR=ndir, BT=_BT, HAS_IDX=idx is not None)
    return y, rstd


def merge_norm_bwd(o, idx, z, weight, rstd, dy, ndir: int, head_dim: int):
    """The backward launch: the gradients of o, z and the norm weight (in weight's dtype)."""
    B, nL, HD = o.shape
    L, H = nL // ndir, HD // head_dim
    grid = (B, -(-L // _BT), H)
    do = torch.empty_like(o)
    dz = torch.empty_like(z)
    dw = torch.empty(B * H * grid[1], head_dim, device=o.device, dtype=torch.float32)
    _bwd[grid](o, idx if idx is not None else o, z, weight, rstd, dy.contiguous(), do, dz, dw, L, H,
              D=head_dim, NDIR=ndir, BT=_BT, HAS_IDX=idx is not None)
    return do, dz, dw.sum(0).to(weight.dtype)


class _MergeNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, o, idx, z, weight, ndir: int, head_dim: int, eps: float):
        y, rstd = merge_norm_fwd(o, idx, z, weight, ndir, head_dim, eps)
        ctx.save_for_backward(o, idx, z, weight, rstd)
        ctx.cfg = (ndir, head_dim)
        return y

    @staticmethod
    def backward(ctx, dy):
        o, idx, z, weight, rstd = ctx.saved_tensors
        do, dz, dw = merge_norm_bwd(o, idx, z, weight, rstd, dy, *ctx.cfg)
        return do, None, dz, dw, None, None, None


@torch.compiler.disable  # like the GKA kernel call: opaque to dynamo (its Triton launches are not traced)
def merge_norm(o: torch.Tensor, scatter: Optional[torch.Tensor], z: torch.Tensor, weight: torch.Tensor,
               ndir: int, head_dim: int, eps: float) -> torch.Tensor:
    """y[b, p] = RMSNorm(Σ_j o[b, scatter[j·L + p]]) · weight ⊙ SiLU(z[b, p]) per head of ``head_dim``.

    o: [B, n·L, H·D] the stacked directions' outputs (contiguous); scatter: [n·L] int64 or None (identity);
    z: [B, L, H·D] contiguous; weight: [D]. Returns y like z."""
    if not (o.is_contiguous() and z.is_contiguous()):
        raise ValueError('merge_norm takes contiguous o and z')
    if o.shape[1] != ndir * z.shape[1] or o.shape[2] != z.shape[2] or z.shape[2] % head_dim:
        raise ValueError(f'merge_norm: o {list(o.shape)} must be [B, n·L, H·D] for z {list(z.shape)} and n = {ndir}')
    return _MergeNorm.apply(o, scatter, z, weight, ndir, head_dim, eps)
