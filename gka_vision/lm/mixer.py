"""The causal GKA token mixer of the language model, exactly as gka_spec.md §2 describes the authors' LM layer."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gka_kernels import gka_chunk, gka_step

from ..layers import BETA_EPS, GatedRMSNorm, forget_gate_log_decay, init_forget_gate, l2_normalize
from .cache import GKALayerCache
from .config import GKAConfig

__all__ = ['CausalShortConv', 'GKACausalMixer']


class CausalShortConv(nn.Module):
    """Depthwise causal Conv1d (no bias) followed by SiLU, over [B, T, C] inputs, with a decode tail.

    The tail holds the last ``kernel_size - 1`` pre-conv inputs; prepending it (zeros at the start of a sequence)
    makes the prefill and one-token paths the same computation.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        # Depthwise Conv1d with PyTorch's default init (gka_spec.md §2 step 2); only its weight is used.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, tail: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; tail: [B, kernel_size - 1, C] or None (sequence start). Returns (SiLU(conv), new tail)."""
        W = self.kernel_size - 1
        if tail is None:
            tail = x.new_zeros(x.shape[0], W, x.shape[2])
        xp = torch.cat([tail.to(x.dtype), x], dim=1)
        w = self.conv.weight.to(x.dtype)
        if x.shape[1] == 1:
            # one decoded token: a weighted sum of its window, one small kernel instead of a conv launch (the CPU
            # conv1d took ~25 ms per call here, whatever its size)
            y = torch.einsum('btc,ct->bc', xp, w[:, 0]).unsqueeze(1)
        else:
            y = F.conv1d(xp.transpose(1, 2), w, groups=x.shape[2]).transpose(1, 2)
        return F.silu(y), xp[:, xp.shape[1] - W:]


class GKACausalMixer(nn.Module):
    """Causal Gated KalmaNet mixer: projections, short convs, L2-normalised q/k, β/α/forget gates, ``gka_chunk``
    (or ``gka_step`` for one cached token), gated RMSNorm and the output projection (gka_spec.md §2 steps 1-12).

    Parameters (H heads of size D, h = ``num_kv_heads`` native k/v heads, d = hidden size):
        in_proj: Every input projection as one Linear d → 2·H·D + 2·h·D + 3·H, no bias; output columns
            ``[q (H·D) | k (h·D) | v (h·D) | g (H·D, output gate) | β (H) | α (H) | a (H, forget gate)]``.
        qkv_conv: One depthwise causal conv (+ SiLU) over the H·D + 2·h·D channels of q|k|v, in that order.
        gate_bias: [2, H], the biases of β (row 0) and α (row 1).
        A_log, dt_bias: The forget gate's per-head parameters; o_norm, o_proj: gated RMSNorm and output Linear.

    One token with a cache thus costs one input GEMM and one conv per layer.
    """

    def __init__(self, config: GKAConfig):
        super().__init__()
        d, H, D = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads = H
        self.num_kv_heads = config.kv_heads
        self.head_dim = D
        self.num_iter = config.num_iter
        self.ridge_ratio = config.ridge_ratio
        self.chunk_size = config.chunk_size
        h = self.num_kv_heads
        # One input GEMM for every projection of x; output columns [q | k | v | g | β | α | a] of widths
        # [H·D, h·D, h·D, H·D, H, H, H] (the q|k|v block first, so the short conv reads one contiguous slice).
        self.qkv_dim = (H + 2 * h) * D
        self.in_split = (self.qkv_dim, H * D, 2 * H, H)  # [q|k|v], g, [β|α], a
        self.in_proj = nn.Linear(d, sum(self.in_split), bias=False)
        # One depthwise conv over the concatenated q|k|v channels (depthwise, so the same as one conv per stream).
        self.qkv_conv = CausalShortConv(self.qkv_dim, config.conv_size)
        # Biases of β (row 0) and α (row 1), drawn like the bias of a Linear d → H: U(±1/√d).
        self.gate_bias = nn.Parameter(torch.empty(2, H))
        nn.init.uniform_(self.gate_bias, -1 / math.sqrt(d), 1 / math.sqrt(d))
        # The forget gate's per-head parameters; kept fp32-friendly and out of weight decay (gka_spec.md §2 step 7).
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        for prm in (self.A_log, self.dt_bias, self.gate_bias):
            prm._no_weight_decay = True
        self.o_norm = GatedRMSNorm(D, eps=config.norm_eps)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        init_forget_gate(self.A_log, self.dt_bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'A_log', 'dt_bias', 'gate_bias'}

    def _heads(self, x: torch.Tensor, native_heads: int) -> torch.Tensor:
        """[B, T, h·D] → [B, T, H, D], repeating each native head H/h times (grouped k/v heads)."""
        x = x.unflatten(-1, (native_heads, self.head_dim))
        if native_heads != self.num_heads:
            x = x.repeat_interleave(self.num_heads // native_heads, dim=2)
        return x

    def forward(
            self,
            x: torch.Tensor,
            cache: Optional[GKALayerCache] = None,
            use_cache: bool = False,
    ) -> Tuple[torch.Tensor, Optional[GKALayerCache]]:
        """x: [B, T, d]. With ``cache`` the sequence continues from it. Returns (y [B, T, d], new cache or None)."""
        B, T, _ = x.shape
        H, h, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, z, ba, a = self.in_proj(x).split(self.in_split, dim=-1)
        qkv, tail = self.qkv_conv(qkv, cache.conv if cache is not None else None)
        q, k, v = qkv.split((H * D, h * D, h * D), dim=-1)
        q = l2_normalize(self._heads(q, H))
        k = l2_normalize(self._heads(k, h))
        v = self._heads(v, h)
        # β and α in one sigmoid; the bias is added in the projection's dtype, as a Linear with bias would.
        ba = torch.sigmoid(ba.unflatten(-1, (2, H)) + self.gate_bias.to(ba.dtype))
        # β is per expanded head, so grouped heads share k but not their Grams (gka_spec.md pitfall 11).
        beta = (ba[..., 0, :] + BETA_EPS).unsqueeze(-1)
        k = k * beta.to(k.dtype)
        v = v * beta.to(v.dtype)
        alpha = ba[..., 1, :]
        g = forget_gate_log_decay(a, self.A_log, self.dt_bias)

        state = cache.state if cache is not None else None
        # The kernels pick their own precision (fp32 states and accumulation); autocast must not re-cast inside.
        with torch.autocast(x.device.type, enabled=False):
            alpha = alpha.to(q.dtype)
            # g ≤ 0 by construction (forget_gate_log_decay): no value check, so no device sync per layer
            if cache is not None and T == 1:
                o, new_state = gka_step(q, k, v, g, alpha, state, num_iter=self.num_iter,
                                        ridge_ratio=self.ridge_ratio, check_values=False)
            else:
                out = gka_chunk(q, k, v, g, alpha, num_iter=self.num_iter, ridge_ratio=self.ridge_ratio,
                                chunk_size=self.chunk_size, initial_state=state, output_final_state=use_cache,
                                check_values=False)
                o, new_state = out if use_cache else (out, None)
        o = self.o_norm(o, z.unflatten(-1, (H, D)).to(o.dtype))
        y = self.o_proj(o.flatten(-2))
        new_cache = GKALayerCache(tail, *new_state) if use_cache else None
        return y, new_cache
