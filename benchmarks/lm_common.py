"""Shared pieces of the language-model benchmarks (mqar.py, decode.py).

- A softmax-attention baseline with the GKA model's exact skeleton: ``GKAForCausalLM(config,
  mixer_factory=CausalSelfAttention)`` swaps only the token mixer (rotary positions, PyTorch SDPA, a static KV cache).
- One block-level decode loop used for both models, so both pay the same Python overhead per token.
- Result writers (JSON, markdown table) and run metadata.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensure_importable() -> None:
    """Let the scripts run from a plain checkout: gka_vision from the repo root, and kernels/ under its installed
    name gka_kernels (pyproject's package-dir mapping) when the project is not pip-installed."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    try:
        import gka_kernels  # noqa: F401
    except ImportError:
        import importlib.util
        init = os.path.join(_ROOT, 'kernels', '__init__.py')
        spec = importlib.util.spec_from_file_location('gka_kernels', init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules['gka_kernels'] = module
        spec.loader.exec_module(module)


_ensure_importable()

from gka_kernels import resolve_backend  # noqa: E402
from gka_vision.lm import GKAConfig, GKAForCausalLM  # noqa: E402

__all__ = ['CausalSelfAttention', 'AttnLayerCache', 'build_lm', 'decode_step', 'env_info', 'markdown_table',
           'write_outputs', 'is_oom']


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, D] with cos/sin [T, D // 2] (half-split layout; an odd last channel passes)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if x.shape[-1] % 2 else out


@dataclass
class AttnLayerCache:
    """Static KV cache of one attention layer: buffers [B, Hkv, capacity, D] with the first ``length`` slots filled.

    With ``pos`` (a device int64 tensor [1] holding ``length``) the layer runs in static mode for CUDA graphs: one
    token per call, written at ``pos`` with ``index_copy_``, attention over the whole buffer under the mask
    ``slot <= pos`` (cost ∝ capacity; the benchmark sizes the buffer to the context), and ``pos`` advanced in place.
    """
    k: torch.Tensor
    v: torch.Tensor
    length: int
    pos: Optional[torch.Tensor] = None

    @classmethod
    def allocate(cls, batch: int, heads: int, capacity: int, head_dim: int, length: int, device, dtype,
                 random_fill: bool = True, static: bool = False) -> 'AttnLayerCache':
        k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        v = torch.zeros_like(k)
        if random_fill:  # timing does not depend on the values; random keeps softmax well defined
            k[:, :, :length].normal_()
            v[:, :, :length].normal_()
        pos = torch.full((1,), length, dtype=torch.long, device=device) if static else None
        return cls(k, v, length, pos)


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention with rotary positions; projections laid out like the GKA mixer's (one
    fused input Linear ``qkv`` with output columns [q (H·D) | k (h·D) | v (h·D)], then ``o_proj``; no bias, grouped
    k/v heads allowed), so both models pay one input GEMM per layer. Interface: ``forward(x, cache, use_cache) ->
    (y, cache)``."""

    def __init__(self, config: GKAConfig, rope_base: float = 10000.0):
        super().__init__()
        d, H, D = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, config.kv_heads, D
        self.rope_base = rope_base
        self.qkv_split = (H * D, self.num_kv_heads * D, self.num_kv_heads * D)
        self.qkv = nn.Linear(d, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        self._rope_table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _rope(self, length: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables [>= length, D // 2], built once and grown by doubling (no per-step trig kernels)."""
        tab = self._rope_table
        if tab is None or tab[0].shape[0] < length or tab[0].device != device or tab[0].dtype != dtype:
            n = max(length, 2 * tab[0].shape[0] if tab is not None else 256)
            half = self.head_dim // 2
            inv_freq = self.rope_base ** (-torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
            ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
            self._rope_table = tab = (ang.cos().to(dtype), ang.sin().to(dtype))
        return tab

    def forward(self, x: torch.Tensor, cache: Optional[AttnLayerCache] = None, use_cache: bool = False):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv_split, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        gqa = self.num_kv_heads != self.num_heads
        if cache is not None and cache.pos is not None:  # static mode (CUDA graphs): shapes never change
            if T != 1:
                raise ValueError('a static KV cache takes one token per call')
            cap = cache.k.shape[2]
            cos, sin = self._rope(cap, x.device, q.dtype)
            c, s = cos.index_select(0, cache.pos), sin.index_select(0, cache.pos)
            q, k = _rotate(q, c, s), _rotate(k, c, s)
            cache.k.index_copy_(2, cache.pos, k)
            cache.v.index_copy_(2, cache.pos, v)
            # One query against the whole buffer as two batched GEMVs (memory-bound, parallel over the keys); SDPA's
            # masked kernels parallelise a single query poorly at long contexts.
            G = self.num_heads // self.num_kv_heads
            qg = q.view(B, self.num_kv_heads, G, self.head_dim)
            scores = (qg @ cache.k.transpose(-1, -2)).float() * self.head_dim ** -0.5  # [B, Hkv, G, cap]
            valid = torch.arange(cap, device=x.device) <= cache.pos
            probs = scores.masked_fill(~valid, float('-inf')).softmax(-1).to(v.dtype)
            o = (probs @ cache.v).view(B, self.num_heads, 1, self.head_dim)
            cache.pos.add_(1)
            new_cache = cache
        else:
            start = cache.length if cache is not None else 0
            cos, sin = self._rope(start + T, x.device, q.dtype)
            q, k = _rotate(q, cos[start:start + T], sin[start:start + T]), _rotate(k, cos[start:start + T],
                                                                                   sin[start:start + T])
            if cache is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                new_cache = AttnLayerCache(k, v, T) if use_cache else None
            else:
                end = start + T
                if end > cache.k.shape[2]:
                    raise ValueError(f'KV cache capacity {cache.k.shape[2]} exceeded ({end} tokens)')
                cache.k[:, :, start:end] = k
                cache.v[:, :, start:end] = v
                kk, vv = cache.k[:, :, :end], cache.v[:, :, :end]
                if T == 1:
                    o = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)
                else:  # causal among the new tokens, full view of the cached ones
                    mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=gqa)
                new_cache = AttnLayerCache(cache.k, cache.v, end)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        return y, new_cache


def build_lm(kind: str, config: GKAConfig) -> GKAForCausalLM:
    """'gka' (the library model, with config.num_iter) or 'attention' (same skeleton, softmax mixer)."""
    if kind == 'gka':
        return GKAForCausalLM(config)
    if kind == 'attention':
        return GKAForCausalLM(config, mixer_factory=CausalSelfAttention)
    raise ValueError(f'kind must be "gka" or "attention", got {kind!r}')


def decode_step(model: GKAForCausalLM, tokens: torch.Tensor, caches: List) -> Tuple[torch.Tensor, List]:
    """One token [B, 1] through every block with its layer cache; returns next-token logits [B, V] and the caches.

    The same loop drives both mixers (GKA layer caches are ``GKALayerCache``, attention ones ``AttnLayerCache``)."""
    x = model.embed_tokens(tokens)
    new = []
    for block, c in zip(model.layers, caches):
        x, c = block(x, c, True)
        new.append(c)
    return model.lm_head(model.norm(x[:, -1])), new


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or 'out of memory' in str(err).lower()


def env_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        'torch': torch.__version__, 'python': platform.python_version(), 'device': str(device),
        'gka_backend': resolve_backend(None, device), 'GKA_BACKEND': os.environ.get('GKA_BACKEND'),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ['| ' + ' | '.join(str(h) for h in headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(lines)


def write_outputs(out_dir: str, stem: str, payload: Dict, table: str) -> Dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into out_dir; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {'json': os.path.join(out_dir, f'{stem}.json'), 'md': os.path.join(out_dir, f'{stem}.md')}
    with open(paths['json'], 'w') as f:
        json.dump(payload, f, indent=2, default=str)
        f.write('\n')
    with open(paths['md'], 'w') as f:
        f.write(table + '\n')
    return paths


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or a 'no plot: ...' note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f'no plot: {err}'
    return plt


def finish(out_dir: str, stem: str, payload: Dict, setup: str, table: str, plot_fn) -> int:
    """Plot (``plot_fn(png_path)`` returns None or a note on why no plot was made), write the JSON and markdown,
    and print the table last (the GPU tool returns the tail of the output)."""
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f'{stem}.png')
    payload['plot'] = plot_fn(png) or png
    paths = write_outputs(out_dir, stem, payload, f'{setup}\n\n{table}')
    print(f'wrote {paths["json"]}, {paths["md"]}, {payload["plot"]}; total {payload.get("total_s")} s')
    print(setup)
    print(table)
    return 0
