"""The Chebyshev solve: its coefficients and its accuracy against an exact solve (gka_spec.md §3.4)."""
import math

import pytest
import torch

from gka_inputs import make_inputs
from gka_kernels.chebyshev import chebyshev_omegas, chebyshev_solve, safe_frobenius, step_size

SPEC_TABLE = {10: 0.083, 30: 3.0e-4, 50: 1.1e-6}


def test_omega_sequence():
    w = chebyshev_omegas(200, 0.02)
    rho = 1 / 1.04
    assert w[0] == pytest.approx(1 / (1 - rho ** 2 / 2), rel=1e-12)
    assert w[0] == pytest.approx(1.8597, abs=1e-4)
    assert w[-1] == pytest.approx(2 / (1 + math.sqrt(1 - rho ** 2)), rel=1e-9)
    assert w[-1] == pytest.approx(1.5690, abs=1e-4)
    assert chebyshev_omegas(0, 0.02) == ()


def _solver_errors(num_iters, D=64, T=160, H=4):
    """Mean relative error ‖x_N − x*‖/‖x*‖ over every token of a decayed random Gram sequence."""
    q, k, _, g, _ = make_inputs(1, T, H, D)
    hkk = torch.zeros(1, H, D, D, dtype=torch.float64)
    errs = {n: 0.0 for n in num_iters}
    eye = torch.eye(D, dtype=torch.float64)
    for t in range(T):
        hkk = g[:, t].exp()[..., None, None] * hkk + k[:, t, :, :, None] * k[:, t, :, None, :]
        f, _ = safe_frobenius(torch.linalg.matrix_norm(hkk))
        lam = (0.02 * f)[..., None]
        exact = torch.linalg.solve(hkk + lam[..., None] * eye, q[:, t])
        for n in num_iters:
            x = chebyshev_solve(lambda y: (hkk @ y[..., None])[..., 0] + lam * y, q[:, t],
                                step_size(f, 0.02)[..., None], chebyshev_omegas(n, 0.02))
            errs[n] += float(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()) / T
    return errs


def test_solver_accuracy_follows_spec_table():
    errs = _solver_errors(tuple(SPEC_TABLE))
    for n, expected in SPEC_TABLE.items():
        assert expected / 3 <= errs[n] <= expected * 3, (n, errs[n], expected)
    # and the worst-case bound 2·((√51 − 1)/(√51 + 1))^N holds
    for n, e in errs.items():
        assert e <= 2 * ((math.sqrt(51) - 1) / (math.sqrt(51) + 1)) ** n
