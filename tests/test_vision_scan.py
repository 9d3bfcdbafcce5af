"""Scan orders: permutations, inverses, the index cache, and which tokens each order lets a token see."""
from __future__ import annotations

import threading

import pytest
import torch

from gka_vision.models import GKAMixer, block_directions, clear_scan_cache, direction_order, scan_index
from gka_vision.models.scan import DIRECTIONS

GRIDS = [(1, 1), (1, 7), (5, 1), (3, 5), (6, 4)]


def _expected_order(direction, h, w):
    """Written out token by token (the definition, not the implementation's tensor tricks)."""
    if direction in ('row', 'row_rev'):
        order = [r * w + c for r in range(h) for c in range(w)]
    else:
        order = [r * w + c for c in range(w) for r in range(h)]
    return order[::-1] if direction.endswith('_rev') else order


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('direction', DIRECTIONS)
def test_direction_is_the_defined_permutation(direction, grid):
    h, w = grid
    perm = direction_order(direction, h, w)
    assert perm.dtype == torch.long
    assert perm.tolist() == _expected_order(direction, h, w)
    assert sorted(perm.tolist()) == list(range(h * w))


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('scan', ['bi', 'cross', 'alt'])
def test_scan_index_inverse_gather_scatter(scan, grid):
    h, w = grid
    L = h * w
    dirs = block_directions(scan, 1) if scan == 'alt' else block_directions(scan)
    idx = scan_index(dirs, h, w)
    n = len(dirs)
    assert idx.perm.shape == idx.inv.shape == (n, L)
    ar = torch.arange(L)
    for j, d in enumerate(dirs):
        assert idx.perm[j].tolist() == _expected_order(d, h, w)
        assert torch.equal(idx.perm[j][idx.inv[j]], ar)
        assert torch.equal(idx.inv[j][idx.perm[j]], ar)
    # gather stacks the directions in scan order; scatter must bring every direction back to row-major order.
    x = torch.randn(2, L, 3)
    stacked = x.index_select(1, idx.gather)
    for j, d in enumerate(dirs):
        assert torch.equal(stacked[:, j * L:(j + 1) * L], x[:, _expected_order(d, h, w)])
    back = stacked.index_select(1, idx.scatter).view(2, n, L, 3)
    for j in range(n):
        assert torch.equal(back[:, j], x)


def test_block_directions():
    assert block_directions('bi') == ('row', 'row_rev')
    assert block_directions('cross') == ('row', 'row_rev', 'col', 'col_rev')
    assert [block_directions('alt', i)[0] for i in range(6)] == ['row', 'row_rev', 'col', 'col_rev', 'row', 'row_rev']
    with pytest.raises(ValueError, match='scan must be one of'):
        block_directions('zigzag')
    with pytest.raises(ValueError, match='direction must be one of'):
        direction_order('diag', 2, 2)
    with pytest.raises(ValueError, match='at least 1x1'):
        direction_order('row', 0, 3)


def test_cache_is_keyed_by_grid_and_device():
    clear_scan_cache()
    a = scan_index(('row', 'row_rev'), 3, 4, 'cpu')
    assert scan_index(('row', 'row_rev'), 3, 4, torch.device('cpu')) is a  # same device, spelled differently
    assert scan_index(('row', 'row_rev'), 4, 3, 'cpu') is not a
    assert scan_index(('row',), 3, 4, 'cpu') is not a
    m = scan_index(('row', 'row_rev'), 3, 4, 'meta')
    assert m is not a and m.perm.device.type == 'meta' and a.perm.device.type == 'cpu'
    assert scan_index(('row', 'row_rev'), 3, 4, 'cpu') is a  # the meta entry did not replace the cpu one
    clear_scan_cache()
    b = scan_index(('row', 'row_rev'), 3, 4, 'cpu')
    assert b is not a and torch.equal(b.perm, a.perm)


def test_cache_filled_in_inference_mode_serves_training():
    clear_scan_cache()
    mixer = GKAMixer(16, 2, head_dim=8, directions=DIRECTIONS, num_iter=2)
    x = torch.randn(1, 3, 4, 16)
    with torch.inference_mode():
        mixer(x)  # the first call for this grid happens under inference mode (timm / eval pipelines do this)
    idx = scan_index(DIRECTIONS, 3, 4)
    assert not idx.perm.is_inference() and not idx.gather.is_inference()
    mixer(x.requires_grad_()).sum().backward()  # indexing saves the cached index for backward
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cache_is_thread_safe():
    clear_scan_cache()
    grids = [(h, w) for h in range(1, 9) for w in range(1, 5)]
    errors = []

    def work(offset):
        try:
            for i in range(len(grids)):
                h, w = grids[(i + offset) % len(grids)]
                idx = scan_index(DIRECTIONS, h, w, 'cpu')
                for j, d in enumerate(DIRECTIONS):
                    assert idx.perm[j].tolist() == _expected_order(d, h, w)
        except Exception as e:  # collected: an assertion in a thread does not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k * 7,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _reach(mixer, h, w, targets=None):
    """reach[i, s] = True when output token targets[i] has a non-zero gradient w.r.t. input token s (row-major)."""
    targets = list(range(h * w)) if targets is None else targets
    x = torch.randn(1, h, w, mixer.dim, dtype=torch.float64, requires_grad=True)
    y = mixer(x).reshape(h * w, -1)
    reach = torch.zeros(len(targets), h * w, dtype=torch.bool)
    for i, t in enumerate(targets):
        (g,) = torch.autograd.grad(y[t].sum(), x, retain_graph=True)
        reach[i] = g.reshape(h * w, -1).abs().amax(-1) > 0
    return reach


def _mixer(directions, seed=0):
    torch.manual_seed(seed)
    # A 1×1 "conv" keeps every token on its own so reachability is the scan's alone (the 3×3 conv adds neighbours).
    return GKAMixer(16, 2, head_dim=8, directions=directions, num_iter=3, conv_size=1, dtype=torch.float64)


# 9×8 = 72 tokens spans two chunks of the torch backend (64), so inter-chunk states are covered too; there the
# targets are the tokens at scan steps around the chunk boundary and at both ends.
@pytest.mark.parametrize('grid', [(4, 5), (9, 8)])
@pytest.mark.parametrize('direction', DIRECTIONS)
def test_one_direction_sees_only_its_predecessors(direction, grid):
    h, w = grid
    order = direction_order(direction, h, w)
    steps = range(h * w) if h * w <= 20 else [0, 1, 31, 62, 63, 64, 65, 70, 71]
    targets = [int(order[s]) for s in steps]
    reach = _reach(_mixer((direction,)), h, w, targets)
    pos = torch.empty(h * w, dtype=torch.long)
    pos[order] = torch.arange(h * w)  # scan step of each token
    allowed = pos[None, :] <= pos[targets][:, None]
    assert torch.equal(reach, allowed)


@pytest.mark.parametrize('directions', [('row', 'row_rev'), DIRECTIONS, ('col', 'col_rev')])
def test_bidirectional_sees_every_token(directions):
    reach = _reach(_mixer(directions), 4, 5)
    assert bool(reach.all())


def test_conv_adds_only_the_3x3_neighbourhood():
    torch.manual_seed(0)
    mixer = GKAMixer(16, 2, head_dim=8, directions=('row',), num_iter=3, conv_size=3, dtype=torch.float64)
    h, w = 4, 5
    reach = _reach(mixer, h, w)
    pos = torch.arange(h * w)
    r, c = pos // w, pos % w
    # a token sees every token whose 3×3 neighbourhood contains a row-major predecessor-or-self of it
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)  # near[u, s]
    allowed = (near.double() @ (pos[:, None] <= pos[None, :]).double() > 0)  # [s, t]: some u ≤ t near s
    assert torch.equal(reach, allowed.t())
