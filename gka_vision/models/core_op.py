"""The vision mixer's core as one torch.library op pair, for torch.compile: the depthwise conv, the input glue
(scan_qkv), the GKA kernel and the merge + gated RMSNorm (merge_norm).

Eager runs these as three autograd nodes whose saved q, k, v are rebuilt in the backward by saved-tensor hooks
(rebuild.py). Dynamo traces neither the hooks nor the Triton launches, so under torch.compile each is a graph break
(three per block). As one op with a shape function and a registered backward, the whole model is one graph, and
the backward op recomputes the conv output and q, k, v from what the op keeps (the projection y, the conv weight,
β), as eager does: the same kernels. The output gate's projection z = x·W_gᵀ runs inside the op too, so its backward
rebuilds z from x and W_g (which the projection's backward needs anyway) instead of keeping it, as eager does.

The default under torch.compile since a GPU run timed it against the graph breaks (KERNEL_NOTES.md v24: a training
step 0.89× their time at 224 px, 1.01× at 1024 px, on an H100, when the op still kept z); ``GKA_COMPILE_CORE=0``
when the model is built keeps the graph breaks (``GKAMixer.compile_core``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gka_kernels.triton.function import kernel_config, prepare, triton_backward, triton_forward
from gka_kernels.triton.ops import empty_if_none

from .merge_norm import merge_norm_bwd, merge_norm_fwd
from .scan_qkv import _conv_rows, _scan_bwd, _scan_fwd

__all__ = ['mixer_core']


def _qkv(y, conv_w, perm, beta, ndir, head_dim, l2_eps, padding):
    # the conv in y's dtype, as autocast runs it in eager mode (y is the bf16 projection there)
    raw = _conv_rows(y, conv_w.to(y.dtype), padding).contiguous()
    return raw, _scan_fwd(raw, perm, beta, ndir, head_dim, l2_eps)


def _gate(x_gate, w_gate):
    # the output gate [B, L, H·D] in x_gate's dtype, as autocast runs the projection (the caller casts x_gate)
    B, Hg, Wg, _ = x_gate.shape
    return F.linear(x_gate, w_gate.to(x_gate.dtype)).reshape(B, Hg * Wg, w_gate.shape[0])


@torch.library.custom_op('gka_vision::mixer_core', mutates_args=())
def mixer_core_fwd(y: Tensor, conv_w: Tensor, perm: Optional[Tensor], inv: Optional[Tensor],
                   scatter: Optional[Tensor], beta: Tensor, g: Tensor, alpha: Tensor, x_gate: Tensor,
                   w_gate: Tensor, norm_w: Tensor,
                   ndir: int, head_dim: int, l2_eps: float, padding: int, num_iter: int, ridge_ratio: float,
                   norm_eps: float, need_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, o, rstd, x, f): out [B, L, H·D] is the normed, gated output before the mixer's projection; o (the
    stacked directions' GKA output), rstd, x and f are what the backward reads (x, f empty where absent).
    x_gate [B, Hg, Wg, d] and w_gate [H·D, d] make the output gate z."""
    with torch.autocast(y.device.type, enabled=False):
        # the conv output is dropped once q, k, v exist, and they once the kernel has run: the op's inputs stay
        # alive to its end (the graph holds them), so anything else kept here adds to the inference peak
        q, k, v = _qkv(y, conv_w, perm, beta, ndir, head_dim, l2_eps, padding)[1]
        C, dot, scale = kernel_config(q)
        q, k, v, g32 = prepare(q, k, v, g)
        o, _, _, x, f = triton_forward(q, k, v, g32, alpha, None, None, num_iter, ridge_ratio, scale, C, dot,
                                       need_grad)
        del q, k, v, g32
        z = _gate(x_gate, w_gate)
        B, L, HD = z.shape
        o = o.reshape(B, ndir * L, HD)
        out, rstd = merge_norm_fwd(o, scatter, z, norm_w, ndir, head_dim, norm_eps)
    return out, o, rstd, empty_if_none(x, o), empty_if_none(f, o)


@mixer_core_fwd.register_fake
def _mixer_core_fake(y, conv_w, perm, inv, scatter, beta, g, alpha, x_gate, w_gate, norm_w, ndir, head_dim, l2_eps,
                     padding, num_iter, ridge_ratio, norm_eps, need_grad):
    B, Hg, Wg, _ = x_gate.shape
    L, HD = Hg * Wg, w_gate.shape[0]
    H = HD // head_dim
    f32 = torch.float32
    solve = num_iter > 0
    x = y.new_empty(B * ndir, L, H, head_dim, dtype=f32) if solve and need_grad else y.new_empty(0, dtype=f32)
    f = y.new_empty(B * ndir, L, H, dtype=f32) if solve else y.new_empty(0, dtype=f32)
    return x_gate.new_empty(B, L, HD), y.new_empty(B, ndir * L, HD), y.new_empty(B, L, H, dtype=f32), x, f


@torch.library.custom_op('gka_vision::mixer_core_bwd', mutates_args=())
def mixer_core_bwd(dout: Tensor, y: Tensor, conv_w: Tensor, perm: Optional[Tensor], inv: Optional[Tensor],
                   scatter: Optional[Tensor], beta: Tensor, g: Tensor, alpha: Tensor, x_gate: Tensor,
                   w_gate: Tensor, norm_w: Tensor, o: Tensor, rstd: Tensor, x: Tensor, f: Tensor, ndir: int,
                   head_dim: int, l2_eps: float, padding: int, num_iter: int, ridge_ratio: float) -> List[Tensor]:
    """Gradients of y, conv_w, beta, g, alpha, x_gate, w_gate and norm_w, each in its input's dtype and
    contiguous."""
    with torch.autocast(y.device.type, enabled=False):
        z = _gate(x_gate, w_gate)   # rebuilt, as eager's merge rebuilds it
        do, dz, dnorm_w = merge_norm_bwd(o, scatter, z, norm_w, rstd, dout, ndir, head_dim)
        del z
        # the projection's backward as autograd runs it for F.linear: ∂x = ∂z·W, ∂Wᵀ = xᵀ·∂z
        dz2, x2 = dz.to(x_gate.dtype).reshape(-1, dz.shape[-1]), x_gate.reshape(-1, x_gate.shape[-1])
        dx_gate = dz2.mm(w_gate.to(x_gate.dtype)).view(x_gate.shape)
        dw_gate = x2.t().mm(dz2).t()
        del dz, dz2, x2
        raw, (q, k, v) = _qkv(y, conv_w, perm, beta, ndir, head_dim, l2_eps, padding)   # rebuilt as in eager
        C, dot, scale = kernel_config(q)
        q, k, v, g32 = prepare(q, k, v, g)
        dq, dk, dv, dg, dalpha, _, _ = triton_backward(
            q, k, v, g32, alpha, None, None, x if x.numel() else None, f if f.numel() else None,
            do.view(q.shape[0], q.shape[1], q.shape[2], -1), None, None, num_iter, ridge_ratio, scale, C, dot,
            [True] * 5 + [False, False])
        del q, k, v, g32, do
        draw, dbeta = _scan_bwd(raw, inv, beta, dq, dk, dv, ndir, head_dim, l2_eps)
        del raw, dq, dk, dv
        B, C3, Hg, Wg = y.shape
        grad_conv = draw.view(B, Hg, Wg, C3).permute(0, 3, 1, 2)
        dy, dw, _ = torch.ops.aten.convolution_backward(
            grad_conv, y, conv_w.to(y.dtype), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], C3,
            [True, True, False])
    grads = (dy, dw.to(conv_w.dtype), dbeta, dg.to(g.dtype), dalpha.to(alpha.dtype), dx_gate,
             dw_gate.to(w_gate.dtype), dnorm_w)
    return [t.contiguous() for t in grads]


@mixer_core_bwd.register_fake
def _mixer_core_bwd_fake(dout, y, conv_w, perm, inv, scatter, beta, g, alpha, x_gate, w_gate, norm_w, o, rstd, x, f,
                         ndir, head_dim, l2_eps, padding, num_iter, ridge_ratio):
    return [t.new_empty(t.shape) for t in (y, conv_w, beta, g, alpha, x_gate, w_gate, norm_w)]


def _setup_context(ctx, inputs, output):
    (y, conv_w, perm, inv, scatter, beta, g, alpha, x_gate, w_gate, norm_w, ndir, head_dim, l2_eps, padding,
     num_iter, ridge_ratio, norm_eps, need_grad) = inputs
    _, o, rstd, x, f = output
    ctx.save_for_backward(y, conv_w, perm, inv, scatter, beta, g, alpha, x_gate, w_gate, norm_w, o, rstd, x, f)
    ctx.cfg = (ndir, head_dim, l2_eps, padding, num_iter, ridge_ratio)
    ctx.mark_non_differentiable(o, rstd, x, f)


def _backward(ctx, dout, _do, _drstd, _dx, _df):
    saved = ctx.saved_tensors
    dy, dw, dbeta, dg, dalpha, dx_gate, dw_gate, dnorm_w = mixer_core_bwd(dout, *saved, *ctx.cfg)
    return (dy, dw, None, None, None, dbeta, dg, dalpha, dx_gate, dw_gate, dnorm_w) + (None,) * 8


mixer_core_fwd.register_autograd(_backward, setup_context=_setup_context)


def mixer_core(y: Tensor, conv: torch.nn.Conv2d, perm: Optional[Tensor], inv: Optional[Tensor],
               scatter: Optional[Tensor], beta: Tensor, g: Tensor, alpha: Tensor, x_gate: Tensor, w_gate: Tensor,
               norm_w: Tensor, ndir: int, head_dim: int, l2_eps: float, num_iter: int, ridge_ratio: float,
               norm_eps: float) -> Tensor:
    """The mixer's normed, gated output [B, L, H·D] from its projection y [B, 3·H·D, Hg, Wg] and the output gate's
    input x_gate [B, Hg, Wg, d] (in the dtype the gate's projection computes in) and weight w_gate [H·D, d]: the
    inputs of conv_scan_qkv, gka_chunk, the gate projection and merge_norm together."""
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (y, conv.weight, beta, g, alpha, x_gate, w_gate, norm_w))
    out, _, _, _, _ = mixer_core_fwd(y, conv.weight, perm, inv, scatter, beta, g, alpha, x_gate, w_gate, norm_w,
                                     ndir, head_dim, l2_eps, conv.padding[0], num_iter, ridge_ratio, norm_eps,
                                     need_grad)
    return out
