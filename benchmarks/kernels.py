"""Speed of gka_chunk (Triton backend) beside PyTorch SDPA and, when installed, fla's chunk_simple_gla.

Times fwd and fwd+bwd at the PERF_TARGETS.md shapes and over a T sweep (D = 64 and 128), bf16, 30 iterations,
median of triton.testing.do_bench. Writes kernels.json, kernels.md and kernels.png into --out.

    python benchmarks/kernels.py --out /tmp/bench            # everything
    python benchmarks/kernels.py --quick                       # the target shapes only
    python benchmarks/kernels.py --iter-split --out /tmp/bench   # forward vs backward cost of one solve step
    python benchmarks/kernels.py --kernel-split --out /tmp/bench # that cost per GPU kernel (torch.profiler)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# Target ratios (PERF_TARGETS.md): gka fwd+bwd / SDPA fwd+bwd, or an absolute fwd time for the D128 shape.
TARGETS = {
    'B256 T196 H6 D64': ('fwd+bwd / sdpa fwd+bwd', 3.9),
    'B256 T256 H6 D64': ('fwd+bwd / sdpa fwd+bwd', 3.9),
    'B16 T4096 H6 D64': ('fwd+bwd / sdpa fwd+bwd', 0.69),
    'B16 T16384 H6 D64': ('fwd+bwd / sdpa fwd+bwd', 0.17),
    'B4 T4096 H16 D128': ('fwd ms', 1.7),
}
TARGET_SHAPES = [(256, 196, 6, 64), (256, 256, 6, 64), (16, 4096, 6, 64), (16, 16384, 6, 64), (4, 4096, 16, 128)]


def shape_name(B, T, H, D):
    return f'B{B} T{T} H{H} D{D}'


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median'))


def gka_inputs(B, T, H, D, dtype=torch.bfloat16, requires_grad=False, device='cuda'):
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    beta = torch.rand(B, T, H, 1, device=device) * 0.9 + 0.1
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1) * beta
    v = torch.randn(B, T, H, D, device=device) * beta
    g = -torch.rand(B, T, H, device=device) * 0.3
    a = torch.rand(B, T, H, device=device)
    out = [q.to(dtype), k.to(dtype), v.to(dtype), g, a.to(dtype)]
    return [t.requires_grad_(requires_grad) for t in out]


def time_gka(B, T, H, D, mode: str, num_iter=30, chunk_size: Optional[int] = None) -> float:
    from gka_kernels import gka_chunk
    ins = gka_inputs(B, T, H, D, requires_grad=mode == 'fwdbwd')
    kw = dict(num_iter=num_iter, chunk_size=chunk_size, backend='triton')
    if mode == 'fwd':
        with torch.no_grad():
            return _bench(lambda: gka_chunk(*ins, **kw))
    do = torch.randn(B, T, H, D, device='cuda', dtype=torch.bfloat16)

    def step():
        for t in ins:
            t.grad = None
        gka_chunk(*ins, **kw).backward(do)
    return _bench(step)


def time_sdpa(B, T, H, D, mode: str) -> float:
    q, k, v = (torch.randn(B, H, T, D, device='cuda', dtype=torch.bfloat16, requires_grad=mode == 'fwdbwd')
               for _ in range(3))
    if mode == 'fwd':
        with torch.no_grad():
            return _bench(lambda: F.scaled_dot_product_attention(q, k, v))
    do = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(do)
    return _bench(step)


def _fla_version() -> Optional[str]:
    """fla's version where it is importable (the GPU image lacks it; benchmarks/gpu_suite.sh says how to carry it)."""
    try:
        from importlib.metadata import version
        import fla  # noqa: F401
        return version('fla-core')
    except Exception:
        return None


def time_fla(B, T, H, D, mode: str) -> Optional[float]:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None
    q, k, v = (torch.randn(B, T, H, D, device='cuda', dtype=torch.bfloat16, requires_grad=mode == 'fwdbwd')
               for _ in range(3))
    g = (-torch.rand(B, T, H, device='cuda') * 0.3).requires_grad_(mode == 'fwdbwd')
    try:
        if mode == 'fwd':
            with torch.no_grad():
                return _bench(lambda: chunk_simple_gla(q, k, v, g))
        do = torch.randn_like(v)

        def step():
            for t in (q, k, v, g):
                t.grad = None
            chunk_simple_gla(q, k, v, g)[0].backward(do)
        return _bench(step)
    except Exception as e:  # fla refuses some backward kernels on Triton 3.4-3.7 / Hopper
        print(f'fla {mode} failed: {type(e).__name__}: {e}', file=sys.stderr)
        return None


def measure(shapes, modes=('fwd', 'fwdbwd')) -> List[Dict]:
    rows = []
    for (B, T, H, D) in shapes:
        row = dict(shape=shape_name(B, T, H, D), B=B, T=T, H=H, D=D)
        for mode in modes:
            for name, fn in (('gka', time_gka), ('sdpa', time_sdpa), ('fla_simple_gla', time_fla)):
                try:
                    row[f'{name}_{mode}_ms'] = fn(B, T, H, D, mode)
                except torch.cuda.OutOfMemoryError:
                    row[f'{name}_{mode}_ms'] = None
                torch.cuda.empty_cache()
        if row.get('gka_fwdbwd_ms') and row.get('sdpa_fwdbwd_ms'):
            row['ratio_fwdbwd'] = row['gka_fwdbwd_ms'] / row['sdpa_fwdbwd_ms']
        if row.get('gka_fwd_ms') and row.get('sdpa_fwd_ms'):
            row['ratio_fwd'] = row['gka_fwd_ms'] / row['sdpa_fwd_ms']
        tgt = TARGETS.get(row['shape'])
        if tgt:
            what, bound = tgt
            val = row.get('gka_fwd_ms') if what == 'fwd ms' else row.get('ratio_fwdbwd')
            row['target'] = f'{what} <= {bound}'
            row['target_met'] = None if val is None else bool(val <= bound)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


SPLIT_ITERS = (10, 20, 30)


def iteration_split(fwd_ms: Dict[int, float], fwdbwd_ms: Dict[int, float], tokens: int, D: int,
                    fwd_chunk: int, bwd_chunk: int = 16) -> Dict:
    """What one solve step costs in the forward and in the backward (fwd+bwd minus fwd), from times at several
    num_iter with every step a full split-product step (GKA_TRITON_FAST_ITERS=0, so the cost is linear in N): the
    least-squares slope (ms per step) and intercept (ms that do not scale with N) of each, and the rate of a step's
    products, counted as two MMAs per product as h16x2 / bf16x3 run them (X·H⁰ 2D², X·Kᵀ and (S⊙M)·K 2CD each, per
    token and head; the backward's adjoint solve tiles C = 16), in TFLOP/s."""
    ns = sorted(fwd_ms)
    bwd = {n: fwdbwd_ms[n] - fwd_ms[n] for n in ns}
    out = {}
    for part, times, C in (('fwd', fwd_ms, fwd_chunk), ('bwd', bwd, bwd_chunk)):
        slope, intercept = statistics.linear_regression(ns, [times[n] for n in ns])
        flop = 2 * (2 * D * D + 4 * C * D) * tokens
        out[f'{part}_ms_per_step'] = slope
        out[f'{part}_fixed_ms'] = intercept
        out[f'{part}_step_tflops'] = flop / (slope * 1e-3) / 1e12 if slope > 0 else None
    out['bwd_over_fwd_per_step'] = out['bwd_ms_per_step'] / out['fwd_ms_per_step']
    return out


def measure_split(shapes) -> List[Dict]:
    from ab import Switch
    from gka_kernels.triton.config import pick_chunk_size
    rows = []
    with Switch({'GKA_TRITON_FAST_ITERS': '0'}):
        for (B, T, H, D) in shapes:
            fwd = {n: time_gka(B, T, H, D, 'fwd', num_iter=n) for n in SPLIT_ITERS}
            fb = {n: time_gka(B, T, H, D, 'fwdbwd', num_iter=n) for n in SPLIT_ITERS}
            row = dict(shape=shape_name(B, T, H, D), fwd_ms=fwd, fwdbwd_ms=fb,
                       **iteration_split(fwd, fb, B * T * H, D, pick_chunk_size(None, D, T, torch.bfloat16)))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def kernel_times(fn: Callable[[], object], reps: int = 5) -> Dict[str, float]:
    """GPU time per call of fn, in ms, for each kernel name (torch.profiler, after two warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: Dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, 'self_device_time_total', None)
        if us is None:
            us = getattr(ev, 'self_cuda_time_total', 0.0)
        if us > 0:
            # torch's elementwise kernels have long templated names: keep the head, sum the rest
            name = ev.key if ev.key.startswith('_') else ev.key.split('<')[0][:60]
            out[name] = out.get(name, 0.0) + us / 1e3 / reps
    return out


def per_kernel_split(per_n: Dict[int, Dict[str, float]], default: Dict[str, float]) -> List[Dict]:
    """Each kernel's least-squares ms per solve step and fixed ms from its times at several N (a kernel missing at
    some N took 0 there), largest default time first."""
    ns = sorted(per_n)
    names = sorted(set().union(*per_n.values(), default), key=lambda k: -default.get(k, 0.0))
    kernels = []
    for name in names:
        ys = [per_n[n].get(name, 0.0) for n in ns]
        slope, intercept = statistics.linear_regression(ns, ys)
        kernels.append(dict(kernel=name, ms_by_n=dict(zip(ns, ys)), ms_per_step=slope, fixed_ms=intercept,
                            default_ms=default.get(name, 0.0)))
    return kernels


def measure_kernel_split(shapes) -> List[Dict]:
    """``iteration_split`` per GPU kernel: each kernel's fwd+bwd time at N = 10, 20, 30 (every step a full step,
    GKA_TRITON_FAST_ITERS=0), its ms per solve step and the ms that do not scale with N; plus the default schedule at
    N = 30. Says which kernels hold the backward's fixed cost."""
    from ab import Switch
    from gka_kernels import gka_chunk
    rows = []
    for (B, T, H, D) in shapes:
        ins = gka_inputs(B, T, H, D, requires_grad=True)
        do = torch.randn(B, T, H, D, device='cuda', dtype=torch.bfloat16)

        def step(n):
            def run():
                for t in ins:
                    t.grad = None
                gka_chunk(*ins, num_iter=n, backend='triton').backward(do)
            return run
        with Switch({'GKA_TRITON_FAST_ITERS': '0'}):
            per_n = {n: kernel_times(step(n)) for n in SPLIT_ITERS}
        default = kernel_times(step(30))
        kernels = per_kernel_split(per_n, default)
        row = dict(shape=shape_name(B, T, H, D), kernels=kernels,
                   total_default_ms=sum(default.values()),
                   total_fixed_ms=sum(k['fixed_ms'] for k in kernels))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def kernel_split_markdown(rows: List[Dict]) -> str:
    lines = []
    for r in rows:
        lines += [f'### {r["shape"]}: fwd+bwd, GPU ms per call (default schedule {r["total_default_ms"]:.3f} ms; '
                  f'fixed part at FAST_ITERS=0 {r["total_fixed_ms"]:.3f} ms)', '',
                  '| kernel | default N=30 | N=10 | N=20 | N=30 | ms per step | fixed ms |', '|---' * 7 + '|']
        for k in r['kernels']:
            ms = k['ms_by_n']
            lines.append(f'| {k["kernel"]} | {k["default_ms"]:.3f} | ' + ' | '.join(f'{ms[n]:.3f}' for n in SPLIT_ITERS)
                         + f' | {k["ms_per_step"]:.4f} | {k["fixed_ms"]:.3f} |')
        lines.append('')
    return '\n'.join(lines)


def _fmt(x, nd=3):
    return '-' if x is None else (f'{x:.{nd}f}' if isinstance(x, float) else str(x))


def markdown(rows: List[Dict]) -> str:
    head = ('| shape | gka fwd ms | gka fwd+bwd ms | SDPA fwd ms | SDPA fwd+bwd ms | fla GLA fwd ms | '
            'fla GLA fwd+bwd ms | fwd ratio | fwd+bwd ratio | target | met |')
    lines = [head, '|' + '---|' * 11]
    for r in rows:
        lines.append('| ' + ' | '.join([
            r['shape'], _fmt(r.get('gka_fwd_ms')), _fmt(r.get('gka_fwdbwd_ms')), _fmt(r.get('sdpa_fwd_ms')),
            _fmt(r.get('sdpa_fwdbwd_ms')), _fmt(r.get('fla_simple_gla_fwd_ms')),
            _fmt(r.get('fla_simple_gla_fwdbwd_ms')), _fmt(r.get('ratio_fwd'), 2),
            _fmt(r.get('ratio_fwdbwd'), 2), r.get('target', ''),
            {True: 'yes', False: 'no', None: ''}[r.get('target_met')]]) + ' |')
    return '\n'.join(lines)


def plot(rows: List[Dict], path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, D in zip(axes, (64, 128)):
        sweep = sorted((r for r in rows if r.get('sweep') and r['D'] == D), key=lambda r: r['T'])
        if not sweep:
            continue
        Ts = [r['T'] for r in sweep]
        for key, label, style in (('gka_fwd_ms', 'GKA fwd', 'o-'), ('gka_fwdbwd_ms', 'GKA fwd+bwd', 's-'),
                                  ('sdpa_fwd_ms', 'SDPA fwd', 'o--'), ('sdpa_fwdbwd_ms', 'SDPA fwd+bwd', 's--'),
                                  ('fla_simple_gla_fwd_ms', 'fla simple GLA fwd', '^:'),
                                  ('fla_simple_gla_fwdbwd_ms', 'fla simple GLA fwd+bwd', 'v:')):
            pts = [(t, r.get(key)) for t, r in zip(Ts, sweep) if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('T (tokens per sequence; B·T fixed)')
        ax.set_ylabel('ms')
        ax.set_title(f'D = {D}, H = {sweep[0]["H"]}, B·T = {sweep[0]["B"] * sweep[0]["T"]}, bf16, 30 iter')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep_shapes(tokens=65536):
    out = []
    for D, H in ((64, 6), (128, 4)):
        T = 256
        while T <= 65536:
            out.append((max(1, tokens // T), T, H, D))
            T *= 4
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.environ.get('OUT', 'bench_out'))
    ap.add_argument('--quick', action='store_true', help='target shapes only, no sweep')
    ap.add_argument('--iter-split', action='store_true',
                    help='only the per-step cost of the forward and the backward at the D = 64 target shapes')
    ap.add_argument('--kernel-split', action='store_true',
                    help='only the per-step and fixed cost of each GPU kernel of fwd+bwd (torch.profiler)')
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.kernel_split:
        rows = measure_kernel_split([(16, 4096, 6, 64), (256, 196, 6, 64)])
        with open(os.path.join(args.out, 'kernel_split.json'), 'w') as fh:
            json.dump(rows, fh, indent=1)
        md = kernel_split_markdown(rows)
        with open(os.path.join(args.out, 'kernel_split.md'), 'w') as fh:
            fh.write(md + '\n')
        print(md)
        return rows
    if args.iter_split:
        rows = measure_split([s for s in TARGET_SHAPES if s[3] == 64 and s[1] != 256])
        with open(os.path.join(args.out, 'iter_split.json'), 'w') as fh:
            json.dump(rows, fh, indent=1)
        return rows
    t0 = time.time()
    rows = measure(TARGET_SHAPES)
    if not args.quick:
        for r in measure(sweep_shapes()):
            r['sweep'] = True
            rows.append(r)
    from provenance import provenance
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__('triton').__version__, fla=_fla_version(), seconds=round(time.time() - t0, 1),
                **provenance())
    with open(os.path.join(args.out, 'kernels.json'), 'w') as fh:
        json.dump(dict(info=info, rows=rows), fh, indent=1)
    md = markdown(rows)
    with open(os.path.join(args.out, 'kernels.md'), 'w') as fh:
        fh.write(f'{info}\n\n{md}\n')
    if not args.quick:
        plot(rows, os.path.join(args.out, 'kernels.png'))
    print(md)
    return rows


if __name__ == '__main__':
    main()
