"""The block's LayerNorms as one Triton kernel each way, fused with the residual add before norm2 and with the cast
that autocast applies after them.

Under bf16 autocast a timm block keeps the residual stream in fp32: LayerNorm runs in fp32 and writes fp32, each
Linear that reads it casts a bf16 copy, and the residual add before norm2 is a pass of its own. For gka_small at
1024 px (batch 16) those passes took ~7 ms of the 56.6-ms forward on the H200 (LayerNorm 3.3, the fp32 adds 2.2,
the casts most of 2.0; benchmarks/KERNEL_NOTES.md). Here one program reads a block of rows once and writes the sum
(fp32, when there is an add) and the normalised rows directly in autocast's dtype. The backward recomputes the
normalised rows from the saved sum and its per-row mean and 1/std, and gives the residual and the branch their
gradients in one pass; the weight and bias gradients are summed from per-program partial sums.

The default on CUDA without autograd (inference), under autocast, for fp32 rows and nn.LayerNorm / timm LayerNorm
modules: 6-7 % more images/s for gka_small at 224 and 1024 px on the H200. Anywhere else (CPU, no autocast,
torch.compile, which fuses these passes itself, and training) the PyTorch ops run. In training the kernels measured
4 % faster at 1024 px but 12 % slower at 224 px, where gka_small's step is bound by the host (benchmarks/
KERNEL_NOTES.md v21); ``GKA_FUSED_NORM=1`` runs them there too, and under TRITON_INTERPRET=1 on a CPU (tests).
``GKA_FUSED_NORM=0`` keeps the PyTorch ops everywhere (benchmarks).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models import register_notrace_function

from ..layers import autocast_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # gka_vision runs without triton (CPU, non-Linux); the fused path is then never enabled
    triton = None

__all__ = ['add_layer_norm', 'layer_norm_cast']

# exactly these: their forward is F.layer_norm over the last dim (subclasses may compute something else)
_LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm)


if triton is not None:
    @triton.jit
    def _fwd(x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, h_ptr, mean_ptr, rstd_ptr, M, N, eps,
             HAS_Y: tl.constexpr, HAS_B: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BN)
        rm = rows < M
        cm = cols < N
        m2 = rm[:, None] & cm[None, :]
        off = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_Y:
            x += tl.load(y_ptr + off, mask=m2, other=0.0).to(tl.float32)
            tl.store(s_ptr + off, x, mask=m2)
        mean = tl.sum(x, 1) / N
        xc = tl.where(m2, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
        h = xc * rstd[:, None] * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            h += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=m2)
        tl.store(mean_ptr + rows, mean, mask=rm)
        tl.store(rstd_ptr + rows, rstd, mask=rm)

    @triton.jit
    def _bwd(s_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr, ds_ptr, dx_ptr, dy_ptr, dw_ptr, db_ptr, M, N,
             HAS_DS: tl.constexpr, HAS_DY: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BN)
        rm = rows < M
        cm = cols < N
        m2 = rm[:, None] & cm[None, :]
        off = rows[:, None] * N + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)
        xhat = tl.where(m2, (tl.load(s_ptr + off, mask=m2, other=0.0) - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(dh_ptr + off, mask=m2, other=0.0).to(tl.float32)
        wdh = dh * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        c1 = tl.sum(xhat * wdh, 1) / N
        c2 = tl.sum(wdh, 1) / N
        dx = (wdh - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(ds_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
        if HAS_DY:
            tl.store(dy_ptr + off, dx.to(dy_ptr.dtype.element_ty), mask=m2)
        tl.store(dw_ptr + pid * N + cols, tl.sum(dh * xhat, 0), mask=cm)
        tl.store(db_ptr + pid * N + cols, tl.sum(dh, 0), mask=cm)


def _tiles(N: int) -> Tuple[int, int]:
    """Row width padded to a power of two, and rows per program: ~4 K fp32 values per tile (32 per thread for each
    live tile at 4 warps, so no spills at the widths of the gka models, 192-768)."""
    bn = triton.next_power_of_2(N)
    return bn, max(1, 4096 // bn)


class _LayerNormFn(torch.autograd.Function):
    """h = LayerNorm(x [+ y]) in out_dtype, and s = x + y in x's dtype when y is given (returned first)."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, eps: float, out_dtype: torch.dtype):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N)
        M = x2.shape[0]
        s = torch.empty_like(x2) if y is not None else x2
        h = torch.empty(M, N, device=x.device, dtype=out_dtype)
        mean = torch.empty(M, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        bn, rows = _tiles(N)
        _fwd[(triton.cdiv(M, rows),)](x2, y if y is not None else x2, weight, bias if bias is not None else weight,
                                       s, h, mean, rstd, M, N, float(eps),
                                       HAS_Y=y is not None, HAS_B=bias is not None, BN=bn, ROWS=rows, num_warps=4)
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.cfg = (shape, y.dtype if y is not None else None)
        if y is None:
            return h.view(shape)
        return s.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        shape, y_dtype = ctx.cfg
        ds, dh = grads if y_dtype is not None else (None, grads[0])
        M, N = s.shape
        bn, rows = _tiles(N)
        grid = triton.cdiv(M, rows)
        dx = torch.empty_like(s)
        want_dy = y_dtype is not None and ctx.needs_input_grad[1]
        dy = torch.empty(M, N, device=s.device, dtype=y_dtype) if want_dy else None
        partial = torch.empty(2, grid, N, device=s.device, dtype=torch.float32)   # per program: weight, bias
        ds = ds.reshape(M, N).contiguous() if ds is not None else None
        _bwd[(grid,)](s, weight, mean, rstd, dh.reshape(M, N).contiguous(), ds if ds is not None else s, dx,
                      dy if dy is not None else dx, partial[0], partial[1], M, N,
                      HAS_DS=ds is not None, HAS_DY=want_dy, BN=bn, ROWS=rows, num_warps=4)
        dw, db = partial.sum(1)
        return (dx.view(shape), dy.view(shape) if dy is not None else None, dw.to(weight.dtype),
                db.to(bias.dtype) if bias is not None else None, None, None)


def _fused_dtype(x: torch.Tensor, norm: nn.Module, y: Optional[torch.Tensor] = None) -> Optional[torch.dtype]:
    """The low-precision dtype the fused kernels write for norm(x [+ y]), or None where the PyTorch ops run."""
    flag = os.environ.get('GKA_FUSED_NORM')
    if flag == '0' or triton is None or torch.compiler.is_compiling():
        return None
    if not (x.is_cuda or (flag == '1' and os.environ.get('TRITON_INTERPRET') == '1')):
        return None
    needs_grad = x.requires_grad or norm.weight.requires_grad or (y is not None and y.requires_grad)
    if flag != '1' and torch.is_grad_enabled() and needs_grad:
        return None   # training: opt-in (the module docstring says why)
    if type(norm) not in _LAYER_NORMS or len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
        return None
    dev = x.device.type
    if not autocast_enabled(dev):
        return None
    dtype = torch.get_autocast_dtype(dev)
    if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16) or not x.is_contiguous() \
            or x.numel() == 0:
        return None
    if norm.weight.dtype != torch.float32 or x.shape[-1] != norm.normalized_shape[0]:
        return None
    return dtype


def _fused(x, y, norm, dtype):   # never traced by dynamo: _fused_dtype returns None while compiling
    return _LayerNormFn.apply(x, y, norm.weight, norm.bias, norm.eps, dtype)


def layer_norm_cast(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """norm(x); on the fused path already in autocast's dtype (the cast every Linear reading it would make)."""
    dtype = _fused_dtype(x, norm)
    return norm(x) if dtype is None else _fused(x, None, norm, dtype)


@register_notrace_function  # an FX leaf: the path depends on the device, dtype and autocast state
def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) for s = x + y, the residual add and the pre-norm of the next branch; on the fused path norm(s)
    is already in autocast's dtype."""
    dtype = _fused_dtype(x, norm, y) if y.shape == x.shape and y.is_contiguous() else None
    if dtype is None:
        s = x + y
        return s, norm(s)
    return _fused(x, y, norm, dtype)
