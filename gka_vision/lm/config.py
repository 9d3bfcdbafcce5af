"""GKAConfig: the hyper-parameters of the causal GKA language model, validated once and stored as JSON."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ['GKAConfig', 'CONFIG_NAME']

CONFIG_NAME = 'config.json'
_MODEL_TYPE = 'gka_causal_lm'


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass
class GKAConfig:
    """Configuration of :class:`GKAForCausalLM` (defaults follow gka_spec.md §2 for the mixer).

    Args:
        vocab_size: Number of token ids; valid ids are ``0 .. vocab_size - 1``.
        hidden_size: Model width d.
        num_layers: Number of pre-norm (GKA mixer + SwiGLU MLP) blocks.
        num_heads: Expanded GKA head count H (the query heads).
        head_dim: Head dim D, shared by q, k and v.
        num_kv_heads: Native k/v head count for grouped k/v projections; must divide ``num_heads``. Each native
            head is repeated ``num_heads // num_kv_heads`` times (gka_spec.md §2 step 3). None = ``num_heads``.
        num_iter: Chebyshev steps of the ridge solve; 0 gives the gated-linear-attention readout.
        ridge_ratio: r in λ_t = r·‖H_t‖_F.
        conv_size: Width of the causal depthwise convolution on q, k and v.
        mlp_ratio: SwiGLU hidden size = ``mlp_ratio * hidden_size`` rounded up to a multiple of 8.
        tie_embeddings: Share the token embedding with the LM head.
        initializer_range: Std of the normal init of the embedding and of every Linear weight.
        norm_eps: Epsilon of the block, final and gated RMSNorms.
        max_length: Optional cap on the positions one sequence may reach (prompt plus generated tokens). The GKA
            state has a fixed size, so the model itself has no limit; None = unlimited.
        chunk_size: Chunk size handed to ``gka_chunk`` (an internal tiling choice); None = the kernel's default.
    """
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 64
    num_kv_heads: Optional[int] = None
    num_iter: int = 30
    ridge_ratio: float = 0.02
    conv_size: int = 4
    mlp_ratio: float = 8 / 3
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    norm_eps: float = 1e-6
    max_length: Optional[int] = None
    chunk_size: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'head_dim', 'conv_size'):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f'GKAConfig.{name} must be an int >= 1, got {value!r}')
        if self.num_kv_heads is not None:
            if not _is_int(self.num_kv_heads) or self.num_kv_heads < 1:
                raise ValueError(f'GKAConfig.num_kv_heads must be None or an int >= 1, got {self.num_kv_heads!r}')
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f'GKAConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads '
                                 f'({self.num_heads}): each k/v head is repeated num_heads // num_kv_heads times')
        if not _is_int(self.num_iter) or self.num_iter < 0:
            raise ValueError(f'GKAConfig.num_iter must be an int >= 0 (0 = gated linear attention readout), '
                             f'got {self.num_iter!r}')
        if not _is_real(self.ridge_ratio) or self.ridge_ratio <= 0:
            raise ValueError(f'GKAConfig.ridge_ratio must be a finite number > 0, got {self.ridge_ratio!r}')
        if not _is_real(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f'GKAConfig.mlp_ratio must be a finite number > 0, got {self.mlp_ratio!r}')
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f'GKAConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}')
        if not _is_real(self.initializer_range) or self.initializer_range <= 0:
            raise ValueError(f'GKAConfig.initializer_range must be a finite number > 0, '
                             f'got {self.initializer_range!r}')
        if not _is_real(self.norm_eps) or self.norm_eps <= 0:
            raise ValueError(f'GKAConfig.norm_eps must be a finite number > 0, got {self.norm_eps!r}')
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 1):
            raise ValueError(f'GKAConfig.max_length must be None (unlimited) or an int >= 1, got {self.max_length!r}')
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f'GKAConfig.chunk_size must be None or an int >= 1, got {self.chunk_size!r}')

    @property
    def kv_heads(self) -> int:
        """Native k/v head count (``num_kv_heads`` or ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def intermediate_size(self) -> int:
        """SwiGLU hidden size: ``mlp_ratio * hidden_size`` rounded up to a multiple of 8."""
        return 8 * math.ceil(self.mlp_ratio * self.hidden_size / 8)

    def cache_signature(self) -> Tuple[int, ...]:
        """The fields that fix the shapes of a decoding cache; a cache is only valid for an equal signature."""
        return (self.num_layers, self.hidden_size, self.num_heads, self.kv_heads, self.head_dim, self.conv_size)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['model_type'] = _MODEL_TYPE
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'GKAConfig':
        d = dict(d)
        model_type = d.pop('model_type', _MODEL_TYPE)
        if model_type != _MODEL_TYPE:
            raise ValueError(f'config model_type must be {_MODEL_TYPE!r}, got {model_type!r}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f'unknown GKAConfig fields {unknown}; expected a subset of {sorted(known)}')
        return cls(**d)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, 'w') as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write('\n')

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> 'GKAConfig':
        with open(path) as f:
            return cls.from_dict(json.load(f))
