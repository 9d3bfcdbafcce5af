"""Scan orders of an H×W patch grid for the GKA vision mixer.

A scan direction is a permutation of the row-major token indices of the grid: ``perm[t]`` is the row-major index
of the token visited at scan step ``t``. The mixer gathers its tokens with ``perm``, runs the causal GKA recurrence
along the scan, and scatters the outputs back with the inverse permutation.

Scan orders (``scan=`` of the mixer and the models):
    ``bi``: row-major forward + reverse (2 directions).
    ``cross``: row-major and column-major, each forward + reverse (4 directions).
    ``alt``: one direction per block, cycling through the four of ``cross`` (cost of one direction).

Index tensors are built once per (directions, grid, device) and cached, so dynamic resolution costs one small
integer build per new grid size.
"""
from __future__ import annotations

import threading
from typing import Dict, NamedTuple, Sequence, Tuple, Union

import torch

__all__ = [
    'DIRECTIONS', 'SCAN_ORDERS', 'ScanIndex', 'block_directions', 'check_scan', 'direction_order', 'scan_index',
    'clear_scan_cache',
]

# The four directions of a 2-D grid; `cross` uses all of them, `alt` cycles through them block by block.
DIRECTIONS = ('row', 'row_rev', 'col', 'col_rev')
SCAN_ORDERS = ('bi', 'cross', 'alt')
_SCAN_DIRECTIONS = {'bi': ('row', 'row_rev'), 'cross': DIRECTIONS}

# The cache holds at most this many entries (a grid-size sweep must not grow memory without bound).
_CACHE_LIMIT = 64


class ScanIndex(NamedTuple):
    """Cached index tensors of a set of scan directions on one grid and device.

    Attributes:
        perm: [n_dir, L] permutation per direction (scan step → row-major token).
        inv: [n_dir, L] inverse permutation per direction (row-major token → scan step).
        gather: [n_dir·L] flat index that stacks the directions of [B, L, ...] into [B, n_dir·L, ...].
        scatter: [n_dir·L] flat index that reads [B, n_dir·L, ...] (direction-major, scan order) back in
            row-major token order per direction: ``out.view(B, n_dir·L, C)[:, scatter]``.
        identity: True when the set is one direction that is already row-major (no gather needed).
    """
    perm: torch.Tensor
    inv: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    identity: bool


def check_scan(scan: str) -> str:
    if scan not in SCAN_ORDERS:
        raise ValueError(f'scan must be one of {SCAN_ORDERS}, got {scan!r}')
    return scan


def block_directions(scan: str, block_idx: int = 0) -> Tuple[str, ...]:
    """Directions that the mixer of block ``block_idx`` runs for a scan order."""
    check_scan(scan)
    if scan == 'alt':
        return (DIRECTIONS[block_idx % len(DIRECTIONS)],)
    return _SCAN_DIRECTIONS[scan]


def direction_order(direction: str, height: int, width: int, device: Union[str, torch.device, None] = None
                    ) -> torch.Tensor:
    """Permutation [H·W] (int64) of the row-major token indices for one direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')
    if height < 1 or width < 1:
        raise ValueError(f'the patch grid must be at least 1x1, got {height}x{width}')
    grid = torch.arange(height * width, dtype=torch.long, device=device).view(height, width)
    if direction.startswith('col'):
        grid = grid.t()
    order = grid.reshape(-1)
    return order.flip(0) if direction.endswith('_rev') else order


_cache: Dict[Tuple[Tuple[str, ...], int, int, torch.device], ScanIndex] = {}
_lock = threading.Lock()


def _canonical_device(device: Union[str, torch.device, None]) -> torch.device:
    # 'cuda' and 'cuda:0' must not share an entry with 'cuda:1': resolve a bare accelerator name to its current index.
    device = torch.device('cpu') if device is None else torch.device(device)
    if device.type != 'cpu' and device.type != 'meta' and device.index is None:
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, 'current_device'):
            device = torch.device(device.type, mod.current_device())
    return device


def _build(directions: Sequence[str], height: int, width: int, device: torch.device) -> ScanIndex:
    L = height * width
    perm = torch.stack([direction_order(d, height, width, device) for d in directions])
    inv = torch.argsort(perm, dim=1)
    offset = torch.arange(len(directions), dtype=torch.long, device=device)[:, None] * L
    identity = len(directions) == 1 and directions[0] == 'row'
    return ScanIndex(perm=perm, inv=inv, gather=perm.reshape(-1), scatter=(inv + offset).reshape(-1),
                     identity=identity)


def scan_index(directions: Sequence[str], height: int, width: int, device: Union[str, torch.device, None] = None
               ) -> ScanIndex:
    """The (cached) index tensors of ``directions`` on an ``height×width`` grid on ``device``.

    The cache key is (directions, height, width, device) with the device index made explicit, so processes that
    use different GPUs, or one process that uses several, never read each other's indices.
    """
    directions = tuple(directions)
    if not directions:
        raise ValueError('directions must name at least one scan direction')
    if torch.compiler.is_compiling():
        # Under torch.compile the few index ops become part of the graph (and are constant-folded); no Python-side
        # cache or lock is touched while tracing.
        return _build(directions, int(height), int(width), torch.device(device) if device is not None else None)
    device = _canonical_device(device)
    key = (directions, int(height), int(width), device)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    # A first call under torch.inference_mode() would otherwise cache inference tensors, which autograd later
    # refuses to save for backward (indexing saves its index): build cached entries as normal tensors.
    with torch.inference_mode(False):
        idx = _build(directions, int(height), int(width), device)
    with _lock:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.pop(next(iter(_cache)))
        _cache.setdefault(key, idx)
        return _cache[key]


def clear_scan_cache() -> None:
    """Drop every cached index tensor."""
    with _lock:
        _cache.clear()
