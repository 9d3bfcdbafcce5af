"""The Triton backend as torch.library ops, for torch.compile.

Dynamo cannot trace the kernels' launch logic (Python over shapes, environment switches and Triton's launcher), and
a ``torch.compiler.disable`` fence costs a graph break per call. As ops with a shape function and a registered
backward, the forward and backward are single opaque nodes in one graph: inductor fuses the code around them, and
``mode='reduce-overhead'`` can capture a whole step in a CUDA graph. Eager calls keep the autograd.Function of
function.py, whose dispatch costs less host time; both run the same ``triton_forward`` / ``triton_backward``.

An op returns tensors only, so absent results travel as empty tensors: x and f (the forward's saved solve outputs)
when there is no backward or no solve, the h0 / u0 gradients when there is no initial state.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .decode import triton_step
from .function import prepare, triton_backward, triton_forward

__all__ = ['chunk_fwd', 'chunk_bwd', 'step', 'empty_if_none']


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """t, or an empty fp32 tensor on like's device where an op has no result to return (ops return tensors only)."""
    return t if t is not None else like.new_empty(0, dtype=torch.float32)


def _or_none(t: Tensor) -> Optional[Tensor]:
    return t if t.numel() > 0 else None


@torch.library.custom_op('gka_kernels::chunk_fwd', mutates_args=())
def chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, alpha: Tensor, h0: Optional[Tensor], u0: Optional[Tensor],
              num_iter: int, ridge_ratio: float, scale: float, chunk_size: int, dot: str,
              need_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, h_kk, h_kv, x, f) as ``function.triton_forward``, with x and f empty where it returns None."""
    q, k, v, g = prepare(q, k, v, g)
    o, hT, uT, x, f = triton_forward(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot,
                                     need_grad)
    return o, hT, uT, empty_if_none(x, q), empty_if_none(f, q)


@chunk_fwd.register_fake
def _chunk_fwd_fake(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot, need_grad):
    B, T, H, D = q.shape
    DV = v.shape[-1]
    f32 = torch.float32
    solve = num_iter > 0
    x = q.new_empty(B, T, H, D, dtype=f32) if solve and need_grad else q.new_empty(0, dtype=f32)
    f = q.new_empty(B, T, H, dtype=f32) if solve else q.new_empty(0, dtype=f32)
    return (q.new_empty(B, T, H, DV), q.new_empty(B, H, D, D, dtype=f32), q.new_empty(B, H, D, DV, dtype=f32),
            x, f)


@torch.library.custom_op('gka_kernels::chunk_bwd', mutates_args=())
def chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, alpha: Tensor, h0: Optional[Tensor], u0: Optional[Tensor],
              x: Tensor, f: Tensor, do: Optional[Tensor], dHT: Optional[Tensor], dUT: Optional[Tensor],
              num_iter: int, ridge_ratio: float, scale: float, chunk_size: int, dot: str,
              needs_input_grad: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (q, k, v, g, alpha, h0, u0), each in its input's dtype; those of h0 / u0 empty when absent
    (zeros when given but nothing depends on it)."""
    if num_iter > 0 and x.numel() == 0:
        raise ValueError('chunk_bwd: x is empty; the forward (chunk_fwd) keeps it only with need_grad=True')
    q2, k2, v2, g2 = prepare(q, k, v, g)
    dq, dk, dv, dg, dalpha, dh0, du0 = triton_backward(
        q2, k2, v2, g2, alpha, h0, u0, _or_none(x), _or_none(f), do, dHT, dUT, num_iter, ridge_ratio, scale,
        chunk_size, dot, needs_input_grad)
    dh0 = (dh0 if dh0 is not None else torch.zeros_like(h0)) if h0 is not None else q.new_empty(0)
    du0 = (du0 if du0 is not None else torch.zeros_like(u0)) if u0 is not None else q.new_empty(0)
    # contiguous, as the shape function promises (compiled code relies on the strides it was traced with)
    return tuple(t.contiguous() for t in (dq, dk, dv, dg.to(g.dtype), dalpha, dh0, du0))


@chunk_bwd.register_fake
def _chunk_bwd_fake(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, num_iter, ridge_ratio, scale, chunk_size, dot,
                    needs_input_grad):
    def like(t):
        return t.new_empty(t.shape) if t is not None else q.new_empty(0)
    return tuple(like(t) for t in (q, k, v, g, alpha, h0, u0))


def _setup_context(ctx, inputs, output):
    q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot, need_grad = inputs
    _, _, _, x, f = output
    ctx.save_for_backward(q, k, v, g, alpha, h0, u0, x, f)
    ctx.cfg = (num_iter, ridge_ratio, scale, chunk_size, dot)
    ctx.mark_non_differentiable(x, f)


def _backward(ctx, do, dHT, dUT, _dx, _df):
    q, k, v, g, alpha, h0, u0, x, f = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:7])
    dq, dk, dv, dg, dalpha, dh0, du0 = chunk_bwd(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, *ctx.cfg, need)
    return (dq, dk, dv, dg, dalpha, dh0 if h0 is not None else None, du0 if u0 is not None else None) + (None,) * 6


chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op('gka_kernels::step', mutates_args=())
def step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, alpha: Tensor, h0: Optional[Tensor], u0: Optional[Tensor],
         num_iter: int, ridge_ratio: float, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """One decoding step, as ``decode.triton_step``: o [B, H, DV] and the new fp32 state (no backward: decoding)."""
    o, (hkk, hkv) = triton_step(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale)
    return o, hkk, hkv


@step.register_fake
def _step_fake(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale):
    B, H, D = q.shape
    DV = v.shape[-1]
    return (q.new_empty(B, H, DV), q.new_empty(B, H, D, D, dtype=torch.float32),
            q.new_empty(B, H, D, DV, dtype=torch.float32))
