"""benchmarks/solve_bounds.py: its Chebyshev iteration is the layer's own on the spec's interval, and both bounds
converge to the exact ridge solution, the tighter one faster."""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import solve_bounds as sb  # noqa: E402
from gka_kernels.chebyshev import chebyshev_omegas, chebyshev_solve, step_size  # noqa: E402


def test_spec_interval_is_the_layers_iteration():
    """On [r f, (1 + r) f] the study's iterates are those of gka_kernels.chebyshev_solve (the recurrence every
    backend runs) after each number of steps, to float64 rounding."""
    r = 0.02
    A, b, f, _ = sb.gram_systems(1, 48, 2, 16, 0.3, r, every=6, seed=3)
    mine = sb.chebyshev_iterates(A, b, r * f, (1 + r) * f, 12)
    for n in (1, 5, 12):
        ref = chebyshev_solve(lambda x: (A @ x[..., None])[..., 0], b, step_size(f, r)[..., None],
                              chebyshev_omegas(n, r))
        assert torch.allclose(mine[n - 1], ref, rtol=1e-12, atol=1e-12), n


def test_errors_fall_with_steps_and_the_tight_bound_is_ahead():
    row = sb.run_case(1, 96, 2, 16, 0.05, 0.02, [5, 10, 20, 30], every=4)
    for name in ('spec', 'tight'):
        errs = [row[name][n] for n in (5, 10, 20, 30)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (name, errs)
    assert row['spec'][30] < 1e-3   # the spec's own convergence table: ~3e-4 at N = 30
    assert 0 < row['lmax_over_f']['median'] < 1   # λ_max ≤ ‖H‖_F, strictly below for a Gram of rank > 1
    assert all(row['tight'][n] < row['spec'][n] for n in (10, 20, 30)), row
    assert '| λ_max |' in sb.markdown([row])
