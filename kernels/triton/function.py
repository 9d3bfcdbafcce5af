"""The autograd.Function of the Triton backend and its public wrapper ``gka_chunk_triton``."""
from __future__ import annotations

from typing import Optional, Tuple

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


class GKATritonFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size, dot, need_grad):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        g = g.to(torch.float32).contiguous()
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
        ctx.save_for_backward(q, k, v, g, alpha, h0, u0, x, f)
        ctx.cfg = (num_iter, ridge_ratio, scale, chunk_size, dot)
        ctx.set_materialize_grads(False)
        return o, HT.view(B, H, D, D), UT.view(B, H, D, DV)

    @staticmethod
    def backward(ctx, do, dHT, dUT):
        q, k, v, g, alpha, h0, u0, x, f = ctx.saved_tensors
        num_iter, r, scale, chunk_size, dot = ctx.cfg
        do = _unit_last(do) if do is not None else None
        with autocast_off(q.device.type):  # the hybrid backward's torch matmuls must stay fp32
            dq, dk, dv, dg, dalpha, dh0, du0 = chunk_backward(q, k, v, g, alpha, h0, u0, x, f, do, dHT, dUT,
                                                              num_iter, r, scale, chunk_size, dot)
        need = ctx.needs_input_grad
        dq, dk, dv, dalpha = (gr.to(t.dtype) for gr, t in ((dq, q), (dk, k), (dv, v), (dalpha, alpha)))
        dh0 = dh0.to(h0.dtype) if h0 is not None and dh0 is not None and need[5] else None
        du0 = du0.to(u0.dtype) if u0 is not None and need[6] else None
        return dq, dk, dv, dg, dalpha, dh0, du0, None, None, None, None, None, None


def gka_chunk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, *,
                     num_iter: int = 30, ridge_ratio: float = 0.02, scale: Optional[float] = None,
                     chunk_size: Optional[int] = None, initial_state: Optional[State] = None,
                     output_final_state: bool = False) -> Tuple[torch.Tensor, Optional[State]]:
    """Triton GKA over whole sequences (inputs as for ``gka_kernels.gka_chunk``, already validated there).

    Returns o [B, T, H, Dv] in q's dtype and, with ``output_final_state``, the fp32 final (h_kk, h_kv)."""
    check_triton_inputs(q, v, chunk_size)
    B, T, H, D = q.shape
    DV = v.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    h0, u0 = initial_state if initial_state is not None else (None, None)
    if T == 0:
        o = q.new_zeros(B, 0, H, DV)
        if not output_final_state:
            return o, None
        zk = q.new_zeros(B, H, D, D, dtype=torch.float32) if h0 is None else h0.to(torch.float32)
        zv = q.new_zeros(B, H, D, DV, dtype=torch.float32) if u0 is None else u0.to(torch.float32)
        return o, (zk, zv)
    C = pick_chunk_size(chunk_size, D, T, q.dtype)
    # x (the solve output) is kept for the backward only; without autograd the forward does not write it
    need_grad = grad_needed((q, k, v, g, alpha, h0, u0))
    o, hT, uT = GKATritonFunction.apply(q, k, v, g, alpha, h0, u0, int(num_iter), float(ridge_ratio), scale, C,
                                        solve_dot_mode(q.dtype, D), need_grad)
    return o, ((hT, uT) if output_final_state else None)
