"""The autograd.Function of the Triton backend, the forward and backward it runs, and the public wrapper
``gka_chunk_triton``. Under torch.compile the same forward and backward run as the torch.library ops of ops.py."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..precision import autocast_off
from ..validation import grad_needed
from .backward import chunk_backward
from .config import check_triton_inputs, forward_pieces, pick_chunk_size, segment_length, solve_dot_mode
from .solve import acc_precision, chunk_forward
from .state_pass import gram_and_kv_states

State = Tuple[torch.Tensor, torch.Tensor]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def prepare(q, k, v, g):
    """The layouts the kernels read: unit stride along the head dim, g fp32 and contiguous (no copy if already)."""
    return _unit_last(q), _unit_last(k), _unit_last(v), g.to(torch.float32).contiguous()


def kernel_config(q: torch.Tensor, chunk_size: Optional[int] = None, scale: Optional[float] = None):
    """What gka_chunk's triton backend runs these inputs with: (chunk size, solve precision, readout scale)."""
    D = q.shape[-1]
    return (pick_chunk_size(chunk_size, D, q.shape[1], q.dtype), solve_dot_mode(q.dtype, D),
            D ** -0.5 if scale is None else float(scale))


def triton_forward(q, k, v, g, alpha, h0, u0, num_iter: int, ridge_ratio: float, scale: float, chunk_size: int,
                   dot: str, need_grad: bool):
    """o [B, T, H, DV] (dtype of q), the final states h_kk [B, H, D, D] and h_kv [B, H, D, DV] (fp32), and what the
    backward reads: the solve output x [B, T, H, D] (None unless ``need_grad`` and num_iter > 0) and the norms
    f [B, T, H] (None when num_iter = 0). q, k, v, g as ``prepare`` returns them; T > 0."""
    prec = acc_precision(q.dtype)
    B, T, H, D = q.shape
    DV = v.shape[-1]
    pieces = forward_pieces(T, segment_length(B, H, D, DV, T, chunk_size), chunk_size)
    if len(pieces) == 1:
        (H0s, HT), (U0s, UT) = gram_and_kv_states(k, v, g, h0, u0, chunk_size, prec=prec)
        o, x, f = chunk_forward(q, k, v, g, alpha, H0s, U0s, num_iter, ridge_ratio, scale, chunk_size, dot,
                                store_x=need_grad)
    else:
        # launches chained through their final states: only one segment's chunk states exist at a time
        solve = num_iter > 0
        o = q.new_empty(B, T, H, DV)
        x = q.new_empty(B, T, H, D, dtype=torch.float32) if solve and need_grad else None
        f = torch.empty_like(g) if solve else None
        HT, UT = h0, u0
        for start, end, C in pieces:
            sl = slice(start, end)
            ks, gs = k[:, sl], g[:, sl]
            (H0s, HT), (U0s, UT) = gram_and_kv_states(ks, v[:, sl], gs, HT, UT, C, prec=prec)
            seg_out = tuple(t[:, sl] if t is not None else None for t in (o, x, f))
            chunk_forward(q[:, sl], ks, v[:, sl], gs, alpha[:, sl], H0s, U0s, num_iter, ridge_ratio, scale,
                          C, dot, store_x=need_grad, out=seg_out)
            # before the next segment's states exist: otherwise two segments' states are alive at once, twice
            # the cap (the allocation-peak emulation of KERNEL_NOTES.md v12 found it)
            del H0s, U0s
    return o, HT.view(B, H, D, D), UT.view(B, H, D, DV), x, f


def triton_backward(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, num_iter: int, ridge_ratio: float, scale: float,
                    chunk_size: int, dot: str, needs_input_grad: Sequence[bool]):
    """Gradients of (q, k, v, g, alpha, h0, u0): q, k, v, alpha in their dtypes, g's fp32; those of h0 and u0 in
    their dtypes, or None where not needed. q, k, v, g as ``prepare`` returns them; do, dHT, dUT may be None."""
    do = _unit_last(do) if do is not None else None
    with autocast_off(q.device.type):  # the hybrid backward's torch matmuls must stay fp32
        dq, dk, dv, dg, dalpha, dh0, du0 = chunk_backward(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT,
                                                          num_iter, ridge_ratio, scale, chunk_size, dot)
    dq, dk, dv, dalpha = (gr.to(t.dtype) for gr, t in ((dq, q), (dk, k), (dv, v), (dalpha, alpha)))
    dh0 = dh0.to(h0.dtype) if h0 is not None and dh0 is not None and needs_input_grad[5] else None
    du0 = du0.to(u0.dtype) if u0 is not None and needs_input_grad[6] else None
    return dq, dk, dv, dg, dalpha, dh0, du0


class GKATritonFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot, need_grad):
        q, k, v, g = prepare(q, k, v, g)
        o, hT, uT, x, f = triton_forward(q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot,
                                         need_grad)
        ctx.save_for_backward(q, k, v, g, alpha, h0, u0, x, f)
        ctx.cfg = (num_iter, ridge_ratio, scale, chunk_size, dot)
        ctx.set_materialize_grads(False)
        return o, hT, uT

    @staticmethod
    def backward(ctx, do, dHT, dUT):
        q, k, v, g, alpha, h0, u0, x, f = ctx.saved_tensors
        grads = triton_backward(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT, *ctx.cfg, ctx.needs_input_grad)
        return grads + (None,) * 6


def gka_chunk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, *,
                     num_iter: int = 30, ridge_ratio: float = 0.02, scale: Optional[float] = None,
                     chunk_size: Optional[int] = None, initial_state: Optional[State] = None,
                     output_final_state: bool = False) -> Tuple[torch.Tensor, Optional[State]]:
    """Triton GKA over whole sequences (inputs as for ``gka_kernels.gka_chunk``, already validated there).

    Returns o [B, T, H, Dv] in q's dtype and, with ``output_final_state``, the fp32 final (h_kk, h_kv)."""
    check_triton_inputs(q, v, chunk_size)
    B, T, H, D = q.shape
    DV = v.shape[-1]
    h0, u0 = initial_state if initial_state is not None else (None, None)
    if T == 0 or B * H == 0:
        # nothing to launch (a grid of zero programs): as the torch backend, an empty output and the state passed on
        o = q.new_zeros(B, T, H, DV)
        if not output_final_state:
            return o, None
        zk = q.new_zeros(B, H, D, D, dtype=torch.float32) if h0 is None else h0.to(torch.float32)
        zv = q.new_zeros(B, H, D, DV, dtype=torch.float32) if u0 is None else u0.to(torch.float32)
        return o, (zk, zv)
    C, dot, scale = kernel_config(q, chunk_size, scale)
    # x (the solve output) is kept for the backward only; without autograd the forward does not write it
    need_grad = grad_needed((q, k, v, g, alpha, h0, u0))
    args = (q, k, v, g, alpha, h0, u0, int(num_iter), float(ridge_ratio), scale, C, dot, need_grad)
    if torch.compiler.is_compiling():
        # dynamo cannot trace the launches' Python; the op is opaque to it, with a shape function and a backward
        from .ops import chunk_fwd
        o, hT, uT, _, _ = chunk_fwd(*args)
    else:
        # eager: the autograd.Function costs ~8 µs of host time per call, the op's dispatch ~45 µs (2-core CPU)
        o, hT, uT = GKATritonFunction.apply(*args)
    return o, ((hT, uT) if output_final_state else None)
