"""The decoding cache of the GKA language model: per layer, the conv tails and the fp32 (h_kk, h_kv) state.

Its size is fixed by the config and the batch: it does not grow with the number of tokens seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from .config import GKAConfig

__all__ = ['GKALayerCache', 'GKACache']


@dataclass
class GKALayerCache:
    """State of one mixer after some tokens.

    Attributes:
        conv: The last ``conv_size - 1`` pre-conv projected inputs of q|k|v (channels in that order),
            [B, conv_size - 1, H·D + 2·h·D] with h = ``num_kv_heads`` (zeros before the first token), so the causal
            conv of the next token sees its full window.
        h_kk: Decayed key Gram Σ e^{Γ_t−Γ_i} k_i k_iᵀ, fp32 [B, H, D, D].
        h_kv: Decayed key-value memory Σ e^{Γ_t−Γ_i} k_i v_iᵀ, fp32 [B, H, D, D].
    """
    conv: torch.Tensor
    h_kk: torch.Tensor
    h_kv: torch.Tensor

    @property
    def state(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.h_kk, self.h_kv


@dataclass
class GKACache:
    """Recurrent cache of every layer, returned by ``GKAForCausalLM.forward`` and passed back to continue a sequence.

    A forward call never modifies the cache it is given; it returns a new one, so one prefix can be continued in
    several ways.

    Attributes:
        layers: One :class:`GKALayerCache` per block.
        seen_tokens: Tokens consumed so far (the position of the next token).
        signature: ``GKAConfig.cache_signature()`` of the model that built it.
    """
    layers: List[GKALayerCache]
    seen_tokens: int
    signature: Tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return self.layers[0].h_kk.shape[0]

    def check(self, config: GKAConfig, batch_size: int, device: torch.device) -> None:
        """Raise ValueError unless this cache fits a model with ``config`` and a batch of ``batch_size`` rows."""
        if tuple(self.signature) != config.cache_signature():
            raise ValueError('cache was built by a model with another config: (num_layers, hidden_size, num_heads, '
                             f'num_kv_heads, head_dim, conv_size) = {tuple(self.signature)}, but this model has '
                             f'{config.cache_signature()}')
        if len(self.layers) != config.num_layers:
            raise ValueError(f'cache has {len(self.layers)} layers, the model has {config.num_layers}')
        H, D, W = config.num_heads, config.head_dim, config.conv_size - 1
        expect = {
            'conv': (batch_size, W, (H + 2 * config.kv_heads) * D),
            'h_kk': (batch_size, H, D, D),
            'h_kv': (batch_size, H, D, D),
        }
        for i, layer in enumerate(self.layers):
            for name, shape in expect.items():
                t = getattr(layer, name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f'cache.layers[{i}].{name} must have shape {list(shape)} for a batch of '
                                     f'{batch_size} (input_ids rows), got {got}')
                if t.device != device:
                    raise ValueError(f'cache.layers[{i}].{name} is on {t.device}, but input_ids is on {device}')
        if not isinstance(self.seen_tokens, int) or self.seen_tokens < 0:
            raise ValueError(f'cache.seen_tokens must be an int >= 0, got {self.seen_tokens!r}')

    def detach(self) -> 'GKACache':
        """A copy cut from the autograd graph (for truncated back-propagation through time)."""
        layers = [GKALayerCache(*(t.detach() for t in (c.conv, c.h_kk, c.h_kv))) for c in self.layers]
        return GKACache(layers, self.seen_tokens, self.signature)

    def state_bytes(self) -> int:
        """Memory held by the cache, in bytes (constant in the number of tokens seen)."""
        return sum(t.numel() * t.element_size() for c in self.layers
                   for t in (c.conv, c.h_kk, c.h_kv))
