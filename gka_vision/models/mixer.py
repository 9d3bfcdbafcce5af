"""GKAMixer: the Gated KalmaNet token mixer (gka_spec.md §2) for a 2-D grid of image tokens.

Differences from the language-model layer of the spec, and why:
    * locality comes from a depthwise 3×3 conv on the patch grid instead of a causal width-4 conv (an image has no
      causal order);
    * the recurrence runs along several scan orders of the grid (scan.py); q/k/v are shared by all directions,
      the β / α / forget gates are per direction; the directions are stacked on the batch axis of ONE
      ``gka_chunk`` call and their outputs are summed before the gated RMSNorm.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from gka_kernels import gka_chunk

from ..layers import (BETA_EPS, L2_EPS, GatedRMSNorm, autocast_enabled, autocast_fanout, forget_gate_log_decay,
                      init_forget_gate)
from .add_norm import layer_norm_cast
from .scan import DIRECTIONS, scan_index

__all__ = ['GKAMixer']


@torch.compiler.disable   # under torch.compile only with the rebuild: saved-tensor hooks are not traced
def _gka_kernel(q, k, v, g, alpha, num_iter: int, ridge_ratio: float, backend: Optional[str],
                rebuild_from: Optional[tuple] = None) -> torch.Tensor:
    # rebuild_from: conv_scan_qkv's inputs, from which the backward rebuilds q, k, v rather than keeping them.
    rebuild = contextlib.nullcontext()
    if rebuild_from is not None:
        from .scan_qkv import rebuild_qkv_in_backward
        rebuild = rebuild_qkv_in_backward(q, k, v, *rebuild_from)
    with rebuild:
        # g = -exp(A_log)·softplus(·) ≤ 0 by construction: skip the value check and its device sync
        return gka_chunk(q, k, v, g, alpha, num_iter=num_iter, ridge_ratio=ridge_ratio, backend=backend,
                         check_values=False)


def _fused_glue(x: torch.Tensor, head_dim: int) -> bool:
    # On by default on CUDA: measured 25-29 % more images/s in inference and 36 % in training for gka_small on the
    # H200, with 24 % less training activation memory (benchmarks/KERNEL_NOTES.md, model glue). GKA_FUSED_GLUE=0
    # keeps the PyTorch glue; =1 also runs the kernels under TRITON_INTERPRET=1 on a CPU (tests).
    flag = os.environ.get('GKA_FUSED_GLUE')
    if flag == '0' or (flag != '1' and not x.is_cuda):
        return False
    from .merge_norm import fused_glue_supported   # imports triton only here
    return fused_glue_supported(x, head_dim)


@torch.compiler.disable  # like the kernel call; the hooks below are set outside anything dynamo traces
def _merge_norm(o, scatter, z, weight, ndir: int, head_dim: int, eps: float,
                z_from: Optional[tuple]) -> torch.Tensor:
    """The fused merge and gated RMSNorm; z_from = (input, weight) of the output-gate projection, which the graph
    keeps for that Linear's own backward: z is then rebuilt from them in the backward instead of kept."""
    from .merge_norm import merge_norm
    rebuild = contextlib.nullcontext()
    if z_from is not None:
        from .rebuild import rebuilt_in_backward
        x_out, w_out = z_from
        shape = z.shape

        def recipe():
            return (F.linear(x_out, w_out).reshape(shape),)
        rebuild = rebuilt_in_backward((z,), recipe, z.device.type)
    with rebuild:
        return merge_norm(o, scatter, z, weight, ndir, head_dim, eps)


@register_notrace_module  # an FX leaf: its shapes drive Python-side index caches and the opaque kernel call
class GKAMixer(nn.Module):
    """Multi-direction Gated KalmaNet mixer over an NHWC token grid.

    Args:
        dim: Model width d.
        num_heads: Heads H.
        head_dim: Head dim D (q, k, v and the output gate).
        directions: Scan directions run by this mixer (see ``scan.DIRECTIONS``).
        num_iter: Chebyshev iterations N of the ridge solve (0 = plain gated linear attention).
        ridge_ratio: r in λ_t = r·‖H_t‖_F.
        conv_size: Kernel of the depthwise conv on the grid (odd).
        norm_eps: Epsilon of the gated RMSNorm.
        proj_drop: Dropout after the output projection.
        backend: gka_chunk backend (None = its default: triton on CUDA when available, torch elsewhere).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int = 64,
            directions: Sequence[str] = ('row', 'row_rev'),
            num_iter: int = 30,
            ridge_ratio: float = 0.02,
            conv_size: int = 3,
            norm_eps: float = 1e-6,
            proj_drop: float = 0.,
            backend: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        directions = tuple(directions)
        for d in directions:
            if d not in DIRECTIONS:
                raise ValueError(f'directions must be a non-empty subset of {DIRECTIONS}, got {directions!r}')
        if not directions:
            raise ValueError(f'directions must be a non-empty subset of {DIRECTIONS}, got {directions!r}')
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
            raise ValueError(f'num_iter must be an int >= 0, got {num_iter!r}')
        if not (isinstance(ridge_ratio, (int, float)) and math.isfinite(ridge_ratio) and ridge_ratio > 0):
            raise ValueError(f'ridge_ratio must be a finite number > 0, got {ridge_ratio!r}')
        if conv_size < 1 or conv_size % 2 == 0:
            raise ValueError(f'conv_size must be a positive odd int (same-size padding), got {conv_size!r}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.directions = directions
        self.num_dir = len(directions)
        self.num_iter = num_iter
        self.ridge_ratio = float(ridge_ratio)
        self.backend = backend
        # Under torch.compile with the fused glue: conv, glue, kernel, gate projection and merge as one op
        # (core_op.py), measured 0.89× the graph-break compile's training step at 224 px and 1.01× at 1024 px on an
        # H100 (KERNEL_NOTES.md v24). GKA_COMPILE_CORE=0 opts out. Read when the model is built, not while dynamo
        # traces: dynamo does not guard on os.environ, so a switch read in forward() is baked into the first
        # compiled graph and shared by every later model of the class. An attribute is guarded.
        self.compile_core = os.environ.get('GKA_COMPILE_CORE', '1') != '0'
        inner = num_heads * head_dim
        n, H = self.num_dir, num_heads

        self.qkv = nn.Linear(dim, 3 * inner, bias=False, **dd)
        self.conv = nn.Conv2d(
            3 * inner, 3 * inner, conv_size, padding=conv_size // 2, groups=3 * inner, bias=False, **dd)
        # The conv runs on channels-last activations, so its weight gradient comes out channels-last; a weight stored
        # the same way keeps DDP's gradient buckets stride-compatible (no "grad strides do not match" copy).
        # (.contiguous(channels_last) is a no-op here: torch ignores the stride of the size-1 input-channel dim)
        w = self.conv.weight.data
        self.conv.weight.data = torch.empty_strided(
            w.shape, (conv_size * conv_size, 1, conv_size, 1), dtype=w.dtype, device=w.device).copy_(w)
        # One Linear for every gate of every direction (W_β, W_α, W_a side by side), laid out [direction, gate, head].
        self.gate_proj = nn.Linear(dim, n * 3 * H, bias=False, **dd)
        # Biases of β and α ([direction, {β, α}, head]); the forget gate's bias is dt_bias (spec §2 step 7).
        self.gate_bias = nn.Parameter(torch.empty(n, 2, H, **dd))
        self.A_log = nn.Parameter(torch.empty(n, H, **dd))
        self.dt_bias = nn.Parameter(torch.empty(n, H, **dd))
        self.out_gate = nn.Linear(dim, inner, bias=False, **dd)
        self.norm = GatedRMSNorm(head_dim, eps=norm_eps, **dd)
        self.proj = nn.Linear(inner, dim, bias=False, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §2 init: PyTorch defaults for the Linears and the conv, U(±1/√d) for the gate biases (what a
        Linear d→H with bias draws), A_log / dt_bias by ``init_forget_gate``, norm weight 1."""
        for m in (self.qkv, self.conv, self.gate_proj, self.out_gate, self.proj):
            m.reset_parameters()
        bound = 1. / math.sqrt(self.dim)
        nn.init.uniform_(self.gate_bias, -bound, bound)
        init_forget_gate(self.A_log, self.dt_bias)
        self.norm.reset_parameters()

    def extra_repr(self) -> str:
        return f'directions={self.directions}, num_iter={self.num_iter}, ridge_ratio={self.ridge_ratio}'

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """x: [B, Hg, Wg, d] token grid (NHWC). Returns the same shape.

        norm: applied to x first. The block passes its pre-norm here rather than calling it itself, so that the
        normalised grid is referenced only by this frame and is dropped before the kernel runs (without autograd:
        it is fp32 under autocast, 96 MiB of gka_small's inference peak at 1024 px, batch 16)."""
        if norm is not None:
            x = layer_norm_cast(x, norm)   # on CUDA under autocast already in bf16 (add_norm.py)
        B, Hg, Wg, C = x.shape
        L = Hg * Wg
        n, H, D = self.num_dir, self.num_heads, self.head_dim
        idx = scan_index(self.directions, Hg, Wg, x.device)

        fused = _fused_glue(x, D)
        # under torch.compile: conv, glue, kernel and merge as one op, so the model is one graph (core_op.py)
        core = fused and self.compile_core and torch.compiler.is_compiling() \
            and self.conv.bias is None and self.out_gate.bias is None and x.device.type != 'meta'
        # one low-precision copy of the normalised grid for the three projections that read it, not one each
        x_qkv, x_gate, x_out = autocast_fanout(x, 3)
        del x
        y = self.qkv(x_qkv).permute(0, 3, 1, 2)
        del x_qkv
        # Training with the fused glue: the conv runs inside conv_scan_qkv, which recomputes its output in the
        # backward rather than saving it. Otherwise raw = [B, Hg, Wg, 3·H·D] before the SiLU, and the projection is
        # not kept (without autograd it is freed here, 3·H·D per token off the inference peak).
        recompute_conv = fused and (torch.is_grad_enabled() or core)
        act_dtype = y.dtype   # the conv's output dtype too, under autocast or not
        if not recompute_conv:
            raw = self.conv(y).permute(0, 2, 3, 1)
            del y

        gates = self.gate_proj(x_gate).reshape(B, L, n, 3, H)
        if idx.identity:
            gates = gates.transpose(1, 2)
        else:
            dir_ids = torch.arange(n, device=x_gate.device)[:, None]
            gates = gates[:, idx.perm, dir_ids]  # [B, n, L, 3, H]: direction j's gates at its own scan order
        ba = torch.sigmoid(gates[..., :2, :] + self.gate_bias[:, None])
        g = forget_gate_log_decay(gates[..., 2, :], self.A_log[:, None], self.dt_bias[:, None])
        beta = (ba[..., 0, :] + BETA_EPS).reshape(B * n, L, H)
        alpha = ba[..., 1, :].reshape(B * n, L, H).to(act_dtype)
        g = g.reshape(B * n, L, H)
        if core:
            # the op runs the gate projection itself (and rebuilds z in its backward): its input in the dtype
            # autocast would compute that Linear in (autocast_fanout's copy already is)
            dev = x_out.device.type
            gate_in, z = x_out, None
            if autocast_enabled(dev) and x_out.dtype in (torch.float32, torch.float16, torch.bfloat16):
                gate_in = x_out.to(torch.get_autocast_dtype(dev))
        else:
            gate_in, z = None, self.out_gate(x_out).reshape(B, L, H * D)
        # Training with the fused glue: z is rebuilt in the backward (_merge_norm) from the gate's input, when that
        # is the tensor the Linear keeps (under autocast only if already cast: autocast_fanout's copy)
        z_from = None
        if recompute_conv and not core and self.out_gate.bias is None:
            dev = x_out.device.type
            if not torch.is_autocast_enabled(dev) or x_out.dtype == torch.get_autocast_dtype(dev):
                z_from = (x_out, self.out_gate.weight)
        del x_gate, x_out   # everything that reads the normalised grid has run

        rebuild_from = None
        perm, inv = (None, None) if idx.identity else (idx.perm, idx.inv)   # the fused glue's scan order
        if core:
            from .core_op import mixer_core
            o = mixer_core(y, self.conv, perm, inv, None if idx.identity else idx.scatter, beta.contiguous(), g,
                           alpha, gate_in, self.out_gate.weight, self.norm.weight, n, D, L2_EPS, self.num_iter,
                           self.ridge_ratio, self.norm.eps)
            return self.proj_drop(self.proj(o.reshape(B, Hg, Wg, H * D)))
        if recompute_conv:
            from .scan_qkv import conv_scan_qkv
            beta = beta.contiguous()
            q, k, v = conv_scan_qkv(y, self.conv, perm, inv, beta, n, D, L2_EPS)
            # the kernel's saved q, k, v are rebuilt from y and β in the backward rather than kept
            rebuild_from = (y, self.conv, perm, beta, n, D, L2_EPS)
            del y
        elif fused:
            from .scan_qkv import scan_qkv
            q, k, v = scan_qkv(raw.reshape(B, L, 3 * H * D).contiguous(), perm, inv, beta.contiguous(), n, D, L2_EPS)
        else:
            qkv = F.silu(raw).reshape(B, L, 3, H, D)
            # 1 / (‖·‖ + eps) of q and k per token and head (gka_spec.md §2 step 4), once and in row-major order:
            # the norm commutes with the scan permutation, and normalisation and β-scaling become one multiply.
            norm_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
            inv_norm = 1.0 / (torch.linalg.vector_norm(qkv[:, :, :2], dim=-1, dtype=norm_dtype) + L2_EPS)
            if idx.identity:
                qkv = qkv.reshape(B * n, L, 3, H, D)
                inv_norm = inv_norm.reshape(B * n, L, 2, H)
            else:
                # [B, L, ...] → [B, n·L, ...] in scan order, then batch-major stacking [B·n, L, ...] is a view.
                qkv = qkv.index_select(1, idx.gather).reshape(B * n, L, 3, H, D)
                inv_norm = inv_norm.index_select(1, idx.gather).reshape(B * n, L, 2, H)
            dt = qkv.dtype
            q = qkv[:, :, 0] * inv_norm[:, :, 0, :, None].to(dt)
            k = qkv[:, :, 1] * (inv_norm[:, :, 1] * beta)[..., None].to(dt)
            v = qkv[:, :, 2] * beta[..., None].to(dt)
            del qkv   # without autograd the gathered copy (n × 3 streams) is freed before the kernel runs
        if not recompute_conv:
            del raw

        if q.device.type == 'meta':
            # Meta tensors carry shapes only (timm builds models on 'meta' to check structure): skip the kernel's
            # value checks and emit its output shape [B·n, L, H, D].
            o = torch.empty_like(v)
        elif torch.compiler.is_compiling() and rebuild_from is None:
            # one op in the compiled graph (gka_kernels' Triton ops; the torch backend fences itself off). With
            # the PyTorch glue (GKA_FUSED_GLUE=0, or off CUDA) the whole model is one graph; the fused glue's
            # kernels are not ops, and each is a graph break.
            o = gka_chunk(q, k, v, g, alpha, num_iter=self.num_iter, ridge_ratio=self.ridge_ratio,
                          backend=self.backend, check_values=False)
        else:
            o = _gka_kernel(q, k, v, g, alpha, self.num_iter, self.ridge_ratio, self.backend, rebuild_from)
            del rebuild_from

        o = o.reshape(B, n * L, H * D)
        if fused:
            o = _merge_norm(o, None if idx.identity else idx.scatter, z, self.norm.weight, n, D, self.norm.eps,
                            z_from)
            del z_from
        else:
            if not idx.identity:
                o = o.index_select(1, idx.scatter)
            o = self.norm(o.reshape(B, n, L, H, D).sum(1), z.reshape(B, L, H, D))
        return self.proj_drop(self.proj(o.reshape(B, Hg, Wg, H * D)))
