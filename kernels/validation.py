"""Input checks for the public entry points, made once per call with messages that name the argument."""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

__all__ = ['GKAInputError', 'check_chunk_inputs', 'check_step_inputs', 'check_options', 'state_dtype', 'grad_needed']

_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GATE_DTYPES = (torch.float32, torch.float64)


class GKAInputError(ValueError):
    """Raised for a malformed input to gka_chunk / gka_step."""


def _fail(msg: str):
    raise GKAInputError(msg)


def _shape(t: torch.Tensor) -> str:
    return 'x'.join(str(s) for s in t.shape) if t.dim() else 'scalar'


def _check_tensor(name: str, t, rank: int, layout: str):
    if not isinstance(t, torch.Tensor):
        _fail(f'{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}')
    if t.dim() != rank:
        _fail(f'{name} must have rank {rank} ({layout}), got rank {t.dim()} (shape {_shape(t)})')


def _values_checked(check_values: Optional[bool] = None) -> bool:
    # The sign check on g reads the tensor, which synchronises a CUDA stream: a caller whose g is ≤ 0 by
    # construction passes check_values=False; GKA_CHECK_VALUES=0 sets the default for everyone.
    if torch.compiler.is_compiling():
        return False
    if check_values is not None:
        return bool(check_values)
    return os.environ.get('GKA_CHECK_VALUES', '1') != '0'


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulation are fp32, or fp64 when the inputs are fp64 (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_needed(tensors) -> bool:
    """Whether autograd will ask for a backward through these inputs (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_options(num_iter, ridge_ratio, scale, chunk_size=None):
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
        _fail(f'num_iter must be an int >= 0 (0 = plain gated linear attention), got {num_iter!r}')
    if isinstance(ridge_ratio, bool) or not isinstance(ridge_ratio, (int, float)) \
            or not math.isfinite(ridge_ratio) or ridge_ratio <= 0:
        _fail(f'ridge_ratio must be a finite number > 0 (λ_t = ridge_ratio·‖H_t‖_F), got {ridge_ratio!r}')
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        _fail(f'scale must be None (= head_dim ** -0.5) or a finite number > 0, got {scale!r}')
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        _fail(f'chunk_size must be None or an int >= 1, got {chunk_size!r}')


def _check_common(q, k, v, g, alpha, lead: Tuple[int, ...], lead_names: str, check_values: Optional[bool] = None):
    B_T_H = lead
    if k.shape[:-1] != q.shape[:-1] or v.shape[:-1] != q.shape[:-1]:
        _fail(f'q, k, v must share the leading dims [{lead_names}]: got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}')
    if k.shape[-1] != q.shape[-1]:
        _fail(f'q and k must have the same head dim: got q {q.shape[-1]} and k {k.shape[-1]}')
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        _fail(f'head dims must be >= 1: got q/k {q.shape[-1]}, v {v.shape[-1]}')
    if g.shape != B_T_H:
        _fail(f'g (per-token log-decay) must have shape [{lead_names}] = {list(B_T_H)}, got {list(g.shape)}')
    if alpha.shape != B_T_H:
        _fail(f'alpha (solve/query mixing) must have shape [{lead_names}] = {list(B_T_H)}, got {list(alpha.shape)}')
    for name, t in (('q', q), ('k', k), ('v', v)):
        if t.dtype not in _FLOAT_INPUTS:
            _fail(f'{name} must be float16, bfloat16, float32 or float64, got {t.dtype}')
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f'q, k, v must have one dtype: got q {q.dtype}, k {k.dtype}, v {v.dtype}')
    if g.dtype not in _GATE_DTYPES:
        _fail(f'g (log-decay) must be float32 or float64 (it is summed over the sequence), got {g.dtype}')
    if not alpha.is_floating_point():
        _fail(f'alpha must be a floating tensor, got {alpha.dtype}')
    dev = q.device
    for name, t in (('k', k), ('v', v), ('g', g), ('alpha', alpha)):
        if t.device != dev:
            _fail(f'{name} is on {t.device} but q is on {dev}: all inputs must be on one device')
    if _values_checked(check_values) and g.numel() and bool((g > 0).any()):
        _fail('g must be <= 0 everywhere: it is a log-decay (γ = exp(g) ≤ 1); '
              f'got max {float(g.max()):.4g}. Use g = -softplus(...) or logsigmoid(...)')


def _check_state(state, name: str, B: int, H: int, Dk: int, Dv: int, dev: torch.device):
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        _fail(f'{name} must be a pair (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]), got {type(state).__name__}')
    for part, t, shape in (('h_kk', state[0], (B, H, Dk, Dk)), ('h_kv', state[1], (B, H, Dk, Dv))):
        _check_tensor(f'{name}.{part}', t, 4, 'B, H, D, D')
        if tuple(t.shape) != shape:
            _fail(f'{name}.{part} must have shape {list(shape)}, got {list(t.shape)}')
        if not t.is_floating_point():
            _fail(f'{name}.{part} must be a floating tensor (fp32 recommended), got {t.dtype}')
        if t.device != dev:
            _fail(f'{name}.{part} is on {t.device} but q is on {dev}')


def check_chunk_inputs(q, k, v, g, alpha, initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]],
                       check_values: Optional[bool] = None):
    for name, t in (('q', q), ('k', k), ('v', v)):
        _check_tensor(name, t, 4, '[B, T, H, D]')
    for name, t in (('g', g), ('alpha', alpha)):
        _check_tensor(name, t, 3, '[B, T, H]')
    _check_common(q, k, v, g, alpha, tuple(q.shape[:3]), 'B, T, H', check_values)
    if initial_state is not None:
        B, _, H, Dk = q.shape
        _check_state(initial_state, 'initial_state', B, H, Dk, v.shape[-1], q.device)


def check_step_inputs(q, k, v, g, alpha, state, check_values: Optional[bool] = None):
    for name, t in (('q', q), ('k', k), ('v', v)):
        _check_tensor(name, t, 3, '[B, H, D]')
    for name, t in (('g', g), ('alpha', alpha)):
        _check_tensor(name, t, 2, '[B, H]')
    _check_common(q, k, v, g, alpha, tuple(q.shape[:2]), 'B, H', check_values)
    if state is not None:
        B, H, Dk = q.shape
        _check_state(state, 'state', B, H, Dk, v.shape[-1], q.device)
