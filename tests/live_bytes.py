"""Live tensor bytes of everything torch allocates inside a block of code (CPU): each tensor an op returns is counted
by its storage until the last tracked tensor on that storage dies. The peak mirrors the CUDA caching allocator's
peak of allocated bytes for the same sequence of allocations, so the inference-memory effect of a change can be
checked on a machine without a GPU (benchmarks/memory_emulation.py)."""
from __future__ import annotations

import weakref
from typing import Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(ignore) as lb: ...`` then ``lb.peak`` (bytes) and ``lb.at_peak``: (bytes, (op, shape,
    dtype)) of every storage alive at the peak, largest first. ``ignore``: tensors that exist already and whose
    storages must not be counted when an op returns a view of them (weights, inputs)."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live = 0
        self.peak = 0
        self.at_peak: List[Tuple[int, Optional[tuple]]] = []
        self._refs = {}    # storage pointer -> number of tracked tensors on it
        self._info = {}    # storage pointer -> (bytes, (op, shape, dtype))
        self._op = ''

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._info.pop(key)[0]

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == 'meta':
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.ignore or storage.nbytes() == 0:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self._info[key] = (storage.nbytes(), (self._op, tuple(t.shape), str(t.dtype)))
            self.live += storage.nbytes()
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = sorted(self._info.values(), key=lambda i: i[0], reverse=True)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


def grouped(at_peak) -> list:
    """``LiveBytes.at_peak`` summed per (op, shape, dtype), largest total first: e.g. a tensor every block saves
    shows up as one group of depth tensors."""
    groups = {}
    for nbytes, (op, shape, dtype) in at_peak:
        grp = groups.setdefault((op, shape, dtype), [0, 0])
        grp[0] += nbytes
        grp[1] += 1
    rows = [dict(mib=round(n / 2 ** 20, 1), count=c, op=op, shape=list(shape), dtype=dtype)
            for (op, shape, dtype), (n, c) in groups.items()]
    return sorted(rows, key=lambda r: r['mib'], reverse=True)
