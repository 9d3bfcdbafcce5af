"""Float64 emulation of the Triton solve's product precisions (CPU, no GPU needed).

The Triton forward and adjoint solves apply H_τ + λ_τ I to the iterate with three products per step: X·H⁰ᵀ, X·Kᵀ
and (S ∘ M)·K. Each can run with operands rounded to bf16 or fp16, split into hi + lo parts, or exact. This script
replaces the torch backend's chunk solve by one that rounds the operands exactly as a scheme says (accumulation
in fp32), runs the operator in float64 otherwise, and reports the errors of o and of every gradient against the
exact float64 operator, so a cheaper scheme can be judged before it is written as a kernel.

    python benchmarks/solve_precision.py                  # every scheme at the default shapes
    python benchmarks/solve_precision.py --schemes bf16x3 fp16-intra

The GPU's bf16 outputs add their own rounding (o ≈ 1.66e-3 rel. RMSE vs float64 at every shape,
benchmarks/KERNEL_NOTES.md); a scheme's cost shows as the rise above that floor: sqrt(floor² + e²).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Callable, Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from gka_inputs import make_inputs, rel_rmse  # noqa: E402

import gka_kernels as gk  # noqa: E402
from gka_kernels.chebyshev import chebyshev_omegas, step_size  # noqa: E402
from gka_kernels.torch_chunk import function as torch_function  # noqa: E402

BF16_FLOOR = 1.66e-3   # the bf16 output rounding measured on the H200


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float64)


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)   # fp32 accumulation


def _product(a: torch.Tensor, b: torch.Tensor, mode: str, b_exact: bool) -> torch.Tensor:
    """a @ b as the kernel computes it. a: the iterate side (rows pre-scaled to O(1) by the caller), b: the
    constant side (the keys, exact in bf16 when b_exact, or H⁰ normalised by its norm)."""
    if mode == 'exact':
        return a @ b
    dt = torch.bfloat16 if mode.startswith('bf16') else torch.float16
    a_hi = _round(a, dt)
    b_hi = b if b_exact and dt == torch.bfloat16 else _round(b, dt)
    out = a_hi @ b_hi
    if mode.endswith('x2') or mode.endswith('x3'):    # the iterate's remainder
        out = out + _round(a - a_hi, dt) @ b_hi
    if mode.endswith('x3') and not (b_exact and dt == torch.bfloat16):   # the constant's remainder
        out = out + a_hi @ _round(b - b_hi, dt)
    return _acc(out)


# scheme: (X·H⁰ᵀ mode, X·Kᵀ mode, (S∘M)·K mode, bf16 MMAs per step, leading single-pass steps[, their operand
# type, bf16 unless given]); 'mmas' counts the later steps
SCHEMES: Dict[str, tuple] = {
    'exact': ('exact', 'exact', 'exact', 0, 0),
    'bf16x3': ('bf16x3', 'bf16x2', 'bf16x2', 7, 0),                # the default (kernels/triton/dots.py)
    'bf16x3 fast10': ('bf16x3', 'bf16x2', 'bf16x2', 7, 10),        # GKA_TRITON_FAST_ITERS=10
    'fp16-intra': ('bf16x3', 'fp16', 'fp16', 5, 0),                # fp16 single pass for the in-chunk products
    'fp16x2-H fp16-intra': ('fp16x2', 'fp16', 'fp16', 4, 0),
    'fp16x3-H fp16-intra': ('fp16x3', 'fp16', 'fp16', 5, 0),
    'fp16 all': ('fp16', 'fp16', 'fp16', 3, 0),
    'bf16 all': ('bf16', 'bf16', 'bf16', 3, 0),                    # the authors' reference
    'bf16x3-H bf16-intra': ('bf16x3', 'bf16', 'bf16', 5, 0),
    'bf16-H': ('bf16', 'bf16x2', 'bf16x2', 5, 0),                  # H⁰ product single pass, in-chunk split
    'fp16-H': ('fp16', 'bf16x2', 'bf16x2', 5, 0),
    'bf16x2-H': ('bf16x2', 'bf16x2', 'bf16x2', 6, 0),              # H⁰ rounded once, the iterate split
    'fp16x2-H': ('fp16x2', 'bf16x2', 'bf16x2', 6, 0),
    'fp16-H fp16-S': ('fp16', 'bf16x2', 'fp16', 4, 0),
    'fp16-H fp16-XK': ('fp16', 'fp16', 'bf16x2', 4, 0),
    'h16x2 fast10 fp16': ('fp16x2', 'bf16x2', 'bf16x2', 6, 10, 'fp16'),   # 10 single-pass fp16 steps first
    'h16x2 fast15 fp16': ('fp16x2', 'bf16x2', 'bf16x2', 6, 15, 'fp16'),
    'h16x2 fast20 fp16': ('fp16x2', 'bf16x2', 'bf16x2', 6, 20, 'fp16'),
    'h16x2 fast10 bf16': ('fp16x2', 'bf16x2', 'bf16x2', 6, 10),
}


def make_solver(scheme: tuple) -> Callable:
    h_mode, k_mode, s_mode, _, fast = scheme[:5]
    fast_mode = scheme[5] if len(scheme) > 5 else 'bf16'   # the leading steps' single-pass operands

    def chunk_solve(rhs, K, H0, d, f, num_iter, ridge_ratio):
        lam = (ridge_ratio * f)[..., None]
        eta = step_size(f, ridge_ratio)[..., None]
        hn = H0.abs().amax((-1, -2), keepdim=True)               # H⁰ / max|H⁰| per chunk, as the kernel
        hn = torch.where(hn > 0, hn, torch.ones_like(hn))
        H0n_t = (H0 / hn).transpose(-1, -2)
        Kt = K.transpose(-1, -2)
        rn = rhs.norm(dim=-1, keepdim=True)                      # rows scaled by f / ‖rhs‖: ‖·‖ ≤ 1/r (fp16 range)
        fs = torch.where(rn > 0, f[..., None] / rn.clamp_min(1e-300), torch.ones_like(rn))

        def matvec(X, single):
            hm, km, sm = (fast_mode,) * 3 if single else (h_mode, k_mode, s_mode)
            Y = X * fs
            S = _product(Y, Kt, km, True)
            out = d.e[..., None] * hn * _product(Y, H0n_t, hm, False) + _product(S * d.M, K, sm, True)
            return out / fs + lam * X

        x_prev = torch.zeros_like(rhs)
        x = eta * rhs
        for i, omega in enumerate(chebyshev_omegas(num_iter, float(ridge_ratio))):
            x_new = omega * (x - eta * (matvec(x, i < fast) - rhs)) + (1.0 - omega) * x_prev
            x_prev, x = x, x_new
        return x
    return chunk_solve


def scheme(name: str) -> tuple:
    """A named scheme, or 'bf16x3 fastN' / 'bf16x3 fp16fastN': the default with N leading single-pass steps."""
    if name in SCHEMES:
        return SCHEMES[name]
    m = re.fullmatch(r'bf16x3 (fp16)?fast(\d+)', name)
    if not m:
        raise ValueError(f'unknown scheme {name!r}')
    return ('bf16x3', 'bf16x2', 'bf16x2', 7, int(m.group(2))) + (('fp16',) if m.group(1) else ())


def run_case(B, T, H, D, decay, schemes, chunk=64, seed=0, num_iter=30, ridge_ratio=0.02):
    torch.manual_seed(seed)
    ins = [t.to(torch.bfloat16).double() if i != 3 else t.double()
           for i, t in enumerate(make_inputs(B, T, H, D, torch.float64, decay=decay))]
    do = torch.randn(B, T, H, D, dtype=torch.float64)

    def run():
        xs = [t.clone().requires_grad_() for t in ins]
        o = gk.gka_chunk(*xs, chunk_size=chunk, backend='torch', num_iter=num_iter, ridge_ratio=ridge_ratio)
        (o * do).sum().backward()
        return [o.detach()] + [t.grad for t in xs]

    original = torch_function.chunk_solve
    torch_function.chunk_solve = make_solver(SCHEMES['exact'])
    try:
        ref = run()
        rows = []
        for name in schemes:
            torch_function.chunk_solve = make_solver(scheme(name))
            got = run()
            row = dict(case=f'B{B} T{T} H{H} D{D} decay {decay} N{num_iter} r{ridge_ratio}', scheme=name,
                       mmas=scheme(name)[3])
            for key, a, b in zip(('o', 'dq', 'dk', 'dv', 'dg', 'dalpha'), got, ref):
                row[key] = rel_rmse(a, b)
            row['o with bf16 floor'] = math.hypot(BF16_FLOOR, row['o'])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        torch_function.chunk_solve = original
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--schemes', nargs='*', default=[s for s in SCHEMES if s != 'exact'],
                   help=f"any of {', '.join(SCHEMES)}, or 'bf16x3 fastN' / 'bf16x3 fp16fastN'")
    p.add_argument('--num-iter', type=int, nargs='*', default=[30])
    p.add_argument('--ridge-ratio', type=float, nargs='*', default=[0.02])
    p.add_argument('--cases', choices=('both', 'vision'), default='both',
                   help='vision: only the B2 T196 H4 D64 case (faster sweeps)')
    p.add_argument('--out', default=None, help='write the rows as JSON here')
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    cases = ((2, 196, 4, 64, 0.3), (1, 512, 2, 64, 0.01))
    for name in args.schemes:
        scheme(name)   # fail early on a typo
    for N in args.num_iter:
        for r in args.ridge_ratio:
            for B, T, H, D, decay in cases[:1 if args.cases == 'vision' else 2]:
                rows += run_case(B, T, H, D, decay, args.schemes, num_iter=N, ridge_ratio=r)
    keys = ['case', 'scheme', 'mmas', 'o', 'o with bf16 floor', 'dq', 'dk', 'dv', 'dg', 'dalpha']
    print('| ' + ' | '.join(keys) + ' |\n' + '|---' * len(keys) + '|')
    for r in rows:
        print('| ' + ' | '.join(f'{r[k]:.2e}' if isinstance(r[k], float) else str(r[k]) for k in keys) + ' |')
    if args.out:
        with open(args.out, 'w') as fh:
            json.dump(rows, fh, indent=1)


if __name__ == '__main__':
    main()
