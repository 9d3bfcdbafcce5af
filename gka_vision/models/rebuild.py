"""Tensors an autograd node would save, kept as a recipe instead and rebuilt in the backward from tensors the graph
keeps anyway (the mixer's q, k, v and output gate in training: KERNEL_NOTES.md v17)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence, Tuple

import torch

__all__ = ['rebuilt_in_backward']


def _key(t: torch.Tensor):
    return t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride())


class _Rebuilt:
    """What autograd keeps instead of one of the tensors: its index in the recipe's output."""
    __slots__ = ('i',)

    def __init__(self, i: int):
        self.i = i


def _hooks_active() -> bool:
    top = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    return top is None or top(False) is not None   # unknown: assume something (a checkpoint) already packs


def rebuilt_in_backward(outs: Sequence[torch.Tensor], recipe: Callable[[], Tuple[torch.Tensor, ...]],
                        device_type: str):
    """A context inside which autograd saves the tensors ``outs`` as indices into ``recipe()``, which the backward
    runs once (without autograd, under the autocast state of this call) when a node first unpacks one of them.
    The recipe must rebuild them bit for bit and may only hold tensors the graph keeps anyway, or nothing is saved.

    A null context with ``GKA_REBUILD_QKV=0``, or when saved-tensor hooks are already active (activation
    checkpointing, which then keeps nothing of the block anyway)."""
    if os.environ.get('GKA_REBUILD_QKV', '1') == '0' or _hooks_active():
        return contextlib.nullcontext()
    keys = {_key(t): i for i, t in enumerate(outs)}
    amp = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    rebuilt = []

    def pack(t):
        i = keys.get(_key(t))
        return t if i is None else _Rebuilt(i)

    def unpack(p):
        if not isinstance(p, _Rebuilt):
            return p
        if not rebuilt:
            with torch.no_grad(), torch.autocast(device_type, dtype=amp[1], enabled=amp[0]):
                rebuilt.extend(recipe())
        return rebuilt[p.i]

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
