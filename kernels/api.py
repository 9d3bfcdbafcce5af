"""Public entry points: gka_chunk (a whole sequence) and gka_step (one token), with backend dispatch."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from .precision import autocast_off
from .validation import GKAInputError, check_chunk_inputs, check_options, check_step_inputs, grad_needed

__all__ = ['gka_chunk', 'gka_step', 'BACKENDS', 'resolve_backend']

State = Tuple[torch.Tensor, torch.Tensor]
BACKENDS = ('triton', 'torch', 'naive')
# The torch backend's chunk, measured on the 2-core CPU with the copy-free solve (2026-11-29): with autograd at
# D = 64, 32 beats 16 by 10-17 % at T = 64 … 4096 (fp32 fwd+bwd; the backward's per-chunk state terms grow with the
# chunk count); without autograd, or at D ≤ 32, the solve's 2D² + 4CD FLOPs per token and step favour 16:
# gka_small inference 220 vs 237 ms at 224 px, gka_tiny 91 vs 101 ms, the digits demo's training step 275 vs 310 ms.
DEFAULT_CHUNK_SIZE = 32
SMALL_CHUNK_SIZE = 16


def _torch_chunk_size(q: torch.Tensor, tensors) -> int:
    return SMALL_CHUNK_SIZE if (q.shape[-1] <= 32 or not grad_needed(tensors)) else DEFAULT_CHUNK_SIZE


def _triton_available() -> bool:
    try:
        from .triton import is_available
    except ImportError:
        return False
    return is_available()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Explicit ``backend`` argument, else the ``GKA_BACKEND`` environment variable, else triton on CUDA (when
    its kernels are importable) and torch elsewhere."""
    name = backend if backend is not None else os.environ.get('GKA_BACKEND') or None
    if name is None:
        return 'triton' if device.type == 'cuda' and _triton_available() else 'torch'
    if name not in BACKENDS:
        src = 'backend' if backend is not None else 'GKA_BACKEND'
        raise GKAInputError(f'{src} must be one of {BACKENDS}, got {name!r}')
    if name == 'triton':
        if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
            raise GKAInputError(f'backend "triton" needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type}')
        if not _triton_available():
            raise GKAInputError('backend "triton" is not available: Triton is not installed or its kernels '
                                'failed to import')
    return name


def _pick_backend(backend: Optional[str], q: torch.Tensor, v: torch.Tensor) -> str:
    """resolve_backend, except that the *default* choice of triton falls back to torch for inputs the kernels are
    not compiled for (fp64, head dims other than 32/64/128); an explicit triton choice raises instead, and so
    does a chunk size the kernels lack (the caller asked for that tiling)."""
    name = resolve_backend(backend, q.device)
    if name == 'triton' and backend is None and not os.environ.get('GKA_BACKEND'):
        from .triton import supports
        if not supports(q, v):
            return 'torch'
    return name


# The torch and naive backends are opaque to torch.compile: unrolling their Python loops (Chebyshev steps, chunks or
# tokens) takes minutes to compile. A graph break each instead; the triton backend is one op in the graph (ops.py).
@torch.compiler.disable
def _torch_backend(*args):
    from .torch_chunk import gka_chunk_torch
    return gka_chunk_torch(*args)


@torch.compiler.disable
def _naive_backend(*args, **kwargs):
    from .reference import gka_naive
    return gka_naive(*args, **kwargs)


def gka_chunk(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        alpha: torch.Tensor,
        *,
        num_iter: int = 30,
        ridge_ratio: float = 0.02,
        scale: Optional[float] = None,
        chunk_size: Optional[int] = None,
        initial_state: Optional[State] = None,
        output_final_state: bool = False,
        backend: Optional[str] = None,
        check_values: Optional[bool] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[State]]]:
    """Gated KalmaNet over a whole sequence (gka_spec.md §3).

    At every token t: H_t = γ_t H_{t-1} + k_t k_tᵀ, U_t = γ_t U_{t-1} + k_t v_tᵀ (γ_t = exp(g_t)), x_t solves
    (H_t + r‖H_t‖_F I) x = q_t by ``num_iter`` Chebyshev steps, q̃_t = q_t + α_t (x_t − q_t) and
    o_t = scale · U_tᵀ q̃_t.

    Args:
        q, k: [B, T, H, Dk], already L2-normalised and (k) β-scaled by the caller.
        v: [B, T, H, Dv], β-scaled.
        g: [B, T, H] log-decay, float32 (or float64), ≤ 0.
        alpha: [B, T, H] mixing weight between the raw query (0) and the ridge solution (1).
        num_iter: Chebyshev steps N; 0 gives plain gated linear attention (alpha unused).
        ridge_ratio: r in λ_t = r·‖H_t‖_F.
        scale: readout scale, default Dk ** -0.5.
        chunk_size: tokens per chunk (an internal tiling choice; the result does not depend on it).
        initial_state: (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]) entering the sequence.
        output_final_state: also return the state after the last token (fp32; fp64 for fp64 inputs).
        backend: 'triton', 'torch' or 'naive'; default from ``GKA_BACKEND``, else triton on CUDA, torch elsewhere.
        check_values: check g ≤ 0 (reads g: one device sync). None = yes unless ``GKA_CHECK_VALUES=0``; callers
            whose g is non-positive by construction (the GKA mixers) pass False.

    Returns:
        o [B, T, H, Dv] in the dtype of q; with ``output_final_state`` the pair (o, (h_kk, h_kv)).
    """
    check_options(num_iter, ridge_ratio, scale, chunk_size)
    check_chunk_inputs(q, k, v, g, alpha, initial_state, check_values)
    name = _pick_backend(backend, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with autocast_off(q.device.type):
        if name == 'naive':
            o, state = _naive_backend(q, k, v, g, alpha, num_iter=num_iter, ridge_ratio=ridge_ratio, scale=scale,
                                      initial_state=initial_state, output_final_state=True)
        elif name == 'torch':
            C = chunk_size or _torch_chunk_size(q, (q, k, v, g, alpha) + tuple(initial_state or ()))
            o, state = _torch_backend(q, k, v, g, alpha, num_iter, ridge_ratio, scale, C, initial_state,
                                      output_final_state)
        else:
            from .triton import gka_chunk_triton
            o, state = gka_chunk_triton(q, k, v, g, alpha, num_iter=num_iter, ridge_ratio=ridge_ratio,
                                        scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                                        output_final_state=output_final_state)
    return (o, state) if output_final_state else o


def gka_step(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        alpha: torch.Tensor,
        state: Optional[State] = None,
        *,
        num_iter: int = 30,
        ridge_ratio: float = 0.02,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
        check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, State]:
    """One token of GKA from a state, O(1) in the sequence length (decoding).

    Args:
        q, k: [B, H, Dk] (or [B, 1, H, Dk]); v: [B, H, Dv] (or [B, 1, H, Dv]).
        g, alpha: [B, H] (or [B, 1, H]).
        state: (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]) from ``gka_chunk(..., output_final_state=True)`` or a
            previous step; None starts from zeros.
        num_iter, ridge_ratio, scale, backend, check_values: as for ``gka_chunk``.

    Returns:
        o in the layout and dtype of q, and the new state (fp32; fp64 for fp64 inputs).
    """
    seq_layout = isinstance(q, torch.Tensor) and q.dim() == 4
    if seq_layout:
        if q.shape[1] != 1:
            raise GKAInputError(f'gka_step takes one token: q of rank 4 must be [B, 1, H, D], got {list(q.shape)}')
        for name, t, rank in (('k', k, 4), ('v', v, 4), ('g', g, 3), ('alpha', alpha, 3)):
            if not isinstance(t, torch.Tensor) or t.dim() != rank or t.shape[1] != 1:
                raise GKAInputError(f'{name} must be a one-token tensor of rank {rank} like q, '
                                    f'got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}')
        q, k, v, g, alpha = (t[:, 0] for t in (q, k, v, g, alpha))
    check_options(num_iter, ridge_ratio, scale)
    check_step_inputs(q, k, v, g, alpha, state, check_values)
    name = _pick_backend(backend, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with autocast_off(q.device.type):
        if name == 'triton':
            from .triton import gka_step_triton
            o, state = gka_step_triton(q, k, v, g, alpha, state, num_iter=num_iter, ridge_ratio=ridge_ratio,
                                       scale=scale)
        else:
            from .torch_chunk import gka_step_torch
            o, state = gka_step_torch(q, k, v, g, alpha, state, num_iter, ridge_ratio, scale)
    return (o[:, None], state) if seq_layout else (o, state)
