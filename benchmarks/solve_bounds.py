"""How far the Chebyshev solve is from the exact ridge solution, with the spec's spectral bound and with the true one
(float64, CPU, no GPU needed).

The layer bounds the spectrum of H_t by its Frobenius norm f_t (gka_spec.md §3.3-3.4): the iteration is tuned for
[r f, (1 + r) f], the same polynomial for every token. The largest eigenvalue λ_max of H_t is usually well below
f_t, so the same accuracy would take fewer steps on the interval [r f, λ_max + r f]. This script measures both
against ``torch.linalg.solve`` on the keys the tests use, token by token, to say how many steps a tighter bound
could save. It is a question for the spec, not a kernel option: a different interval changes the layer's output
at the same N (KERNEL_NOTES.md, "Steps a tighter spectral bound would save").

    python benchmarks/solve_bounds.py
    python benchmarks/solve_bounds.py --decays 0.3 --steps 10 20 30 --ridge-ratio 0.01
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from gka_inputs import make_inputs  # noqa: E402

from gka_kernels.chebyshev import chebyshev_solve  # noqa: E402


def chebyshev_iterates(A: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int):
    """The iterates x_1 … x_steps of the layer's Chebyshev solve (``gka_kernels.chebyshev.chebyshev_solve``, x_0 = 0)
    for A x = b, tuned for the spectrum [lo, hi] of each system: η = 2 / (lo + hi), ρ = (hi − lo) / (hi + lo)."""
    rho = (hi - lo) / (hi + lo)
    # chebyshev_omegas's recurrence for a ρ per system (it takes one ridge ratio for all of them)
    omega, omegas = torch.full_like(rho, 2.0), []
    for _ in range(steps):
        omega = 1.0 / (1.0 - rho * rho / 4.0 * omega)
        omegas.append(omega[..., None])
    eta = (2.0 / (lo + hi))[..., None]

    def matvec(x):
        return (A @ x[..., None])[..., 0]

    return [chebyshev_solve(matvec, b, eta, omegas[:n]) for n in range(1, steps + 1)]


def gram_systems(B: int, T: int, H: int, D: int, decay: float, ridge_ratio: float, every: int, seed: int):
    """(A_t, q_t, f_t, λ_max(H_t)) for every ``every``-th token of the tests' inputs: H_t the decayed key Gram."""
    torch.manual_seed(seed)
    q, k, _, g, _ = make_inputs(B, T, H, D, decay=decay)
    eye = torch.eye(D, dtype=torch.float64)
    Ht = torch.zeros(B, H, D, D, dtype=torch.float64)
    A, rhs, f, lmax = [], [], [], []
    for t in range(T):
        Ht = torch.exp(g[:, t])[..., None, None] * Ht + k[:, t, :, :, None] * k[:, t, :, None, :]
        if t % every == every - 1:
            ft = torch.linalg.matrix_norm(Ht)
            A.append(Ht + (ridge_ratio * ft)[..., None, None] * eye)
            rhs.append(q[:, t])
            f.append(ft)
            lmax.append(torch.linalg.eigvalsh(Ht)[..., -1])
    return torch.stack(A), torch.stack(rhs), torch.stack(f), torch.stack(lmax)


def run_case(B: int, T: int, H: int, D: int, decay: float, ridge_ratio: float, steps: Sequence[int],
             every: int = 8, seed: int = 0) -> Dict:
    """Relative RMSE against the exact solve after each of ``steps``, with the spec's bound f and with λ_max."""
    A, b, f, lmax = gram_systems(B, T, H, D, decay, ridge_ratio, every, seed)
    exact = torch.linalg.solve(A, b[..., None])[..., 0]

    def rel(x):
        return ((x - exact).norm(dim=-1) / exact.norm(dim=-1)).pow(2).mean().sqrt().item()

    lo = ridge_ratio * f
    spec = chebyshev_iterates(A, b, lo, lo + f, max(steps))
    tight = chebyshev_iterates(A, b, lo, lo + lmax, max(steps))
    ratio = (lmax / f).flatten()
    return dict(decay=decay, ridge_ratio=ridge_ratio, lmax_over_f=dict(median=ratio.median().item(),
                                                                        min=ratio.min().item(),
                                                                        max=ratio.max().item()),
                spec={n: rel(spec[n - 1]) for n in steps}, tight={n: rel(tight[n - 1]) for n in steps})


def markdown(rows: List[Dict]) -> str:
    steps = list(rows[0]['spec'])
    lines = ['| decay | r | λ_max / f (median, range) | bound | ' + ' | '.join(f'N = {n}' for n in steps) + ' |',
             '|---|---|---|---|' + '---|' * len(steps)]
    for row in rows:
        lf = row['lmax_over_f']
        head = f"| {row['decay']} | {row['ridge_ratio']} | {lf['median']:.2f} ({lf['min']:.2f}-{lf['max']:.2f})"
        for name in ('spec', 'tight'):
            label = 'f (the spec)' if name == 'spec' else 'λ_max'
            lines.append(f'{head} | {label} | ' + ' | '.join(f'{row[name][n]:.1e}' for n in steps) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', type=int, nargs=4, default=[2, 512, 2, 64], metavar=('B', 'T', 'H', 'D'))
    p.add_argument('--decays', type=float, nargs='+', default=[0.3, 0.05, 0.01],
                   help='log-decays are drawn from [-decay, 0] (tests/gka_inputs.make_inputs)')
    p.add_argument('--ridge-ratio', type=float, default=0.02)
    p.add_argument('--steps', type=int, nargs='+', default=[10, 15, 20, 25, 30])
    p.add_argument('--json', default=None, help='also write the rows here')
    args = p.parse_args(argv)
    rows = [run_case(*args.shape, decay, args.ridge_ratio, args.steps) for decay in args.decays]
    print(markdown(rows))
    if args.json:
        with open(args.json, 'w') as fh:
            json.dump(rows, fh, indent=1)


if __name__ == '__main__':
    main()
