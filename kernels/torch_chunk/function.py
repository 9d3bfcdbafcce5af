"""The autograd.Function of the torch backend."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..precision import autocast_off
from ..validation import state_dtype
from .gram_backward import gram_backward_inter, gram_backward_intra
from .layout import chunk_decay, from_chunks, to_chunks
from .readout import readout_backward, readout_forward, readout_state_grad_increment
from .solve import chunk_solve, frobenius
from .state import forward_states, reverse_states


def _prepare(q, k, v, g, alpha, chunk_size):
    cdt = state_dtype(q.dtype)
    # contiguous once: every batched matmul would otherwise copy the permuted chunk view again
    Q, K, V = (to_chunks(t.to(cdt), chunk_size).contiguous() for t in (q, k, v))
    G, A = (to_chunks(t.to(cdt), chunk_size) for t in (g, alpha))
    d = chunk_decay(G)
    bK = (d.b[..., None] * K).transpose(-1, -2)
    return Q, K, V, A, d, bK @ K, bK @ V


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Suffix sums over all (chunked) tokens of [B, H, NC, C]."""
    B, H, nc, C = x.shape
    flat = x.reshape(B, H, nc * C)
    return (flat.flip(-1).cumsum(-1).flip(-1)).reshape(B, H, nc, C)


def _frob_inner(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return (a.to(b.dtype) * b).sum((-1, -2)) if a is not None else b.new_zeros(b.shape[:2])


class GKAChunkFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, alpha, h0, u0, num_iter, ridge_ratio, scale, chunk_size):
        T = q.shape[1]
        Q, K, V, A, d, Hinc, Uinc = _prepare(q, k, v, g, alpha, chunk_size)
        H0, HT = forward_states(Hinc, d.last, h0)
        U0, UT = forward_states(Uinc, d.last, u0)
        if num_iter > 0:
            f, live = frobenius(K, H0, d)
            X = chunk_solve(Q, K, H0, d, f, num_iter, ridge_ratio)
            Qt = Q + A[..., None] * (X - Q)
        else:
            f = live = X = None
            Qt = Q
        O = readout_forward(Qt, K, V, U0, d, scale)
        ctx.save_for_backward(q, k, v, g, alpha, h0, u0, X, f, live)
        ctx.cfg = (num_iter, ridge_ratio, scale, chunk_size, T)
        ctx.set_materialize_grads(False)
        return from_chunks(O, T).to(q.dtype), HT, UT

    @staticmethod
    def backward(ctx, do, dHT, dUT):
        # saved_tensors is read exactly once: non-reentrant activation checkpointing allows one unpack per tensor
        saved = ctx.saved_tensors
        with autocast_off(saved[0].device.type):
            return GKAChunkFunction._backward(ctx, saved, do, dHT, dUT)

    @staticmethod
    def _backward(ctx, saved, do, dHT, dUT):
        q, k, v, g, alpha, h0, u0, X, f, live = saved
        num_iter, r, scale, chunk_size, T = ctx.cfg
        Q, K, V, A, d, Hinc, Uinc = _prepare(q, k, v, g, alpha, chunk_size)
        H0, HT = forward_states(Hinc, d.last, h0)
        U0, UT = forward_states(Uinc, d.last, u0)
        Qt = Q + A[..., None] * (X - Q) if num_iter > 0 else Q
        dO = to_chunks(do.to(Q.dtype), chunk_size).contiguous() if do is not None \
            else V.new_zeros(*Q.shape[:-1], V.shape[-1])

        RU, dU_init = reverse_states(readout_state_grad_increment(dO, Qt, d, scale), d.last, dUT)
        rg = readout_backward(dO, Qt, K, V, U0, RU, d, scale)
        dk, dgamma = rg.dk, rg.dgamma
        if num_iter > 0:
            dA = (rg.dqt * (X - Q)).sum(-1)
            Ua = chunk_solve(A[..., None] * rg.dqt, K, H0, d, f, num_iter, r)
            dQ = (1 - A[..., None]) * rg.dqt + Ua
            intra = gram_backward_intra(X, Ua, K, H0, d, f, live, r)
            RH, dH_init = reverse_states(intra.increment, d.last, dHT)
            dk_gram = intra.dk + gram_backward_inter(K, RH, d)
            dgamma = dgamma + intra.dgamma_part - 0.5 * (K * dk_gram).sum(-1)
            dk = dk + dk_gram
        else:
            dA = torch.zeros_like(A)
            dQ = rg.dqt
            dH_init = None
            if dHT is not None:
                RH, dH_init = reverse_states(torch.zeros_like(H0), d.last, dHT)
                dk_gram = gram_backward_inter(K, RH, d)
                dgamma = dgamma - 0.5 * (K * dk_gram).sum(-1)
                dk = dk + dk_gram
        # The returned final states depend on Γ at the last (padded) position.
        dgamma[..., -1, -1] += _frob_inner(dHT, HT) + _frob_inner(dUT, UT)
        dG = _reverse_cumsum(dgamma)

        grads = [from_chunks(t, T) for t in (dQ, dk, rg.dv, dG, dA)]
        dq, dk, dv, dg, dalpha = (gr.to(x.dtype) for gr, x in zip(grads, (q, k, v, g, alpha)))
        dh0 = dH_init.to(h0.dtype) if h0 is not None and dH_init is not None and ctx.needs_input_grad[5] else None
        du0 = dU_init.to(u0.dtype) if u0 is not None and ctx.needs_input_grad[6] else None
        return dq, dk, dv, dg, dalpha, dh0, du0, None, None, None, None


def gka_chunk_torch(q, k, v, g, alpha, num_iter, ridge_ratio, scale, chunk_size, initial_state,
                    output_final_state) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    h0, u0 = initial_state if initial_state is not None else (None, None)
    if q.shape[1] == 0:
        # An empty sequence: no output, and the state passes through unchanged.
        B, _, H, Dk = q.shape
        Dv = v.shape[-1]
        cdt = state_dtype(q.dtype)
        hT = q.new_zeros(B, H, Dk, Dk, dtype=cdt) if h0 is None else h0.to(cdt)
        uT = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if u0 is None else u0.to(cdt)
        return q.new_zeros(B, 0, H, Dv), ((hT, uT) if output_final_state else None)
    o, hT, uT = GKAChunkFunction.apply(q, k, v, g, alpha, h0, u0, num_iter, float(ridge_ratio), float(scale),
                                       chunk_size)
    return o, ((hT, uT) if output_final_state else None)
