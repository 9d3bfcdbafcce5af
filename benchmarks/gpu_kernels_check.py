"""One-call GPU check of the Triton kernels: correctness tests, error figures, variants, benchmark, profile.

Run from the repository root on the GPU machine (device tool):
    pip install -e . --no-deps --no-build-isolation -q && python3 benchmarks/gpu_kernels_check.py
Writes into $OUT (at most 8 files): check.md (everything in one page), check.json, pytest_gpu.txt,
kernels.json, kernels.md, kernels.png, profile.txt.
Sections can be chosen: --only tests,variants,schedule,quick,bench,profile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
OUT = os.environ.get('OUT') or os.path.join(ROOT, 'gpu_check_out')
QUICK = False


def section_tests(report):
    t0 = time.time()
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-rA', '-s', '-p', 'no:cacheprovider',
                           '--durations=8', 'tests/test_triton_gpu.py'], cwd=ROOT, capture_output=True, text=True,
                          timeout=480)   # 33 cases: ~330 s on the H200 (2026-11-29)
    text = proc.stdout + proc.stderr
    with open(os.path.join(OUT, 'pytest_gpu.txt'), 'w') as fh:
        fh.write(text)
    summary = [ln for ln in text.splitlines() if re.search(r'\d+ (passed|failed)', ln)]
    # with -s a figure line follows the previous case's progress dot ('.ERR {...}')
    figures = [json.loads(ln[ln.index('ERR {') + 4:]) for ln in text.splitlines() if 'ERR {' in ln]
    report['tests'] = dict(rc=proc.returncode, summary=summary[-1] if summary else text[-400:],
                           failures=[ln for ln in text.splitlines() if ln.startswith('FAILED')],
                           figures=figures, seconds=round(time.time() - t0, 1))
    print('tests:', report['tests']['summary'], flush=True)


VARIANTS = [  # (solve dot mode, chunk size, state tile)
    ('bf16x3', 32, 32), ('tf32x3', 32, 32), ('tf32', 32, 32), ('bf16x3', 16, 32), ('bf16x3', 32, 16),
    ('bf16x3', 32, 64),
]


def section_variants(report):
    """Solve precision x chunk size x state tile: speed at the target shapes, output error at a vision shape vs the
    float64 torch backend (same bf16 inputs, N = 30)."""
    import kernels as kb
    import gka_kernels as gk
    from gka_inputs import make_inputs, rel_rmse
    rows = []
    ins = make_inputs(4, 196, 6, 64, torch.bfloat16, device='cuda')
    ref = gk.gka_chunk(*(t.double() for t in ins), backend='torch')
    for dot, C, tile in VARIANTS:
        os.environ['GKA_TRITON_DOT'] = dot
        os.environ['GKA_TRITON_STATE_TILE'] = str(tile)
        row = dict(dot=dot, chunk=C, state_tile=tile,
                   err_o=rel_rmse(gk.gka_chunk(*ins, chunk_size=C, backend='triton'), ref))
        for shape, modes in (((256, 196, 6, 64), ('fwd', 'fwdbwd')), ((16, 4096, 6, 64), ('fwd', 'fwdbwd')),
                             ((4, 4096, 16, 128), ('fwd',))):
            for mode in modes:
                try:
                    row[f'{kb.shape_name(*shape)} {mode}'] = kb.time_gka(*shape, mode, chunk_size=C)
                except Exception as e:  # a variant may not fit (registers / shared memory)
                    row[f'{kb.shape_name(*shape)} {mode}'] = f'{type(e).__name__}: {str(e)[:100]}'
        print('variant', json.dumps(row), flush=True)
        rows.append(row)
    del os.environ['GKA_TRITON_DOT'], os.environ['GKA_TRITON_STATE_TILE']
    report['variants'] = rows


SCHEDULES = [  # env overrides (kernels/triton: solve_schedule, acc_precision, backward_chunk_size, _num_warps, ...)
    # measured 2026-11-29 (KERNEL_NOTES v6-v9): SOLVE_T=1 (alone and with CHUNK=64), CHUNK=16, SEGMENT=0, WARPS=8,
    # STATE_TILE=16, FAST_ITERS=5, h16x2 with TAIL / FAST_ITERS=10 / FAST_ITERS=15
    {}, {'GKA_TRITON_TAIL': '0', 'GKA_TRITON_FAST_ITERS': '0'}, {'GKA_TRITON_FAST_ITERS': '0'},
    {'GKA_TRITON_FAST_ITERS': '13'}, {'GKA_TRITON_FAST_ITERS': '20'},
    {'GKA_TRITON_FAST_DOT': 'lowp', 'GKA_TRITON_FAST_ITERS': '10'}, {'GKA_TRITON_DOT': 'h16x2'},
    {'GKA_TRITON_CHUNK': '32'}, {'GKA_TRITON_STATE_PAIR': '0'},
]


def section_schedule(report):
    """Iteration schedule of the solve (single-pass leading steps, independent accumulators, chunk, warps): output and
    gradient error vs the float64 torch backend at a vision shape (bf16 inputs, N = 30), and speed."""
    import kernels as kb
    import gka_kernels as gk
    from gka_inputs import make_inputs, rel_rmse
    ins = make_inputs(4, 196, 6, 64, torch.bfloat16, device='cuda')
    do = torch.randn(4, 196, 6, 64, device='cuda', dtype=torch.float64)
    x64 = [t.double().requires_grad_() for t in ins]
    ref = gk.gka_chunk(*x64, backend='torch')
    (ref * do).sum().backward()
    rows = []
    for env in SCHEDULES:
        os.environ.update(env)
        try:
            row = dict(env=' '.join(f"{k.removeprefix('GKA_TRITON_')}={v}" for k, v in env.items()) or 'default')
            xs = [t.detach().requires_grad_() for t in ins]
            o = gk.gka_chunk(*xs, backend='triton')
            (o.double() * do).sum().backward()
            row['err o'] = rel_rmse(o, ref)
            for name, a, b in zip('qkvga', xs, x64):
                row[f'err d{name}'] = rel_rmse(a.grad, b.grad)
            for shape, modes in (((256, 196, 6, 64), ('fwd', 'fwdbwd')), ((16, 4096, 6, 64), ('fwd', 'fwdbwd')),
                                 ((4, 4096, 16, 128), ('fwd',))):
                for mode in modes:
                    try:
                        row[f'{kb.shape_name(*shape)} {mode}'] = kb.time_gka(*shape, mode)
                    except Exception as e:  # a variant may not fit (registers / shared memory)
                        row[f'{kb.shape_name(*shape)} {mode}'] = f'{type(e).__name__}: {str(e)[:100]}'
        finally:
            for key in env:
                del os.environ[key]
        print('schedule', json.dumps(row), flush=True)
        rows.append(row)
    report['schedule'] = rows


def section_quick(report):
    """Small follow-up checks: the backward paths (fused / hybrid) against each other and the float64 torch
    backend, their speed at D = 64 and 128, and num_warps of the forward kernel."""
    import kernels as kb
    import gka_kernels as gk
    from gka_inputs import make_inputs, rel_rmse
    rows = []
    for shape in ((1, 2048, 4, 128), (4, 196, 6, 64)):
        ins = make_inputs(*shape, torch.bfloat16, device='cuda')
        do = torch.randn(*shape, device='cuda', dtype=torch.float64)
        x64 = [t.double().requires_grad_() for t in ins]
        (gk.gka_chunk(*x64, backend='torch') * do).sum().backward()
        row = dict(shape=kb.shape_name(*shape))
        for mode in ('fused', 'hybrid', 'fused+acc_tf32'):
            os.environ['GKA_TRITON_BWD'] = mode.split('+')[0]
            if mode.endswith('tf32'):
                os.environ['GKA_TRITON_ACC'] = 'tf32'
            xs = [t.detach().requires_grad_() for t in ins]
            (gk.gka_chunk(*xs, backend='triton').double() * do).sum().backward()
            for name, a, b in zip('qkvga', xs, x64):
                row[f'{mode} d{name}'] = rel_rmse(a.grad, b.grad)
            os.environ.pop('GKA_TRITON_ACC', None)
        del os.environ['GKA_TRITON_BWD']
        print('quick', json.dumps(row), flush=True)
        rows.append(row)
    for shape in ((256, 196, 6, 64), (4, 4096, 16, 128)):
        row = dict(shape=kb.shape_name(*shape))
        for mode in ('fused', 'hybrid'):
            os.environ['GKA_TRITON_BWD'] = mode
            row[f'{mode} fwdbwd'] = kb.time_gka(*shape, 'fwdbwd')
        del os.environ['GKA_TRITON_BWD']
        if shape[3] == 64:
            os.environ['GKA_TRITON_ACC'] = 'tf32'
            row['acc tf32 fused fwdbwd'] = kb.time_gka(*shape, 'fwdbwd')
            del os.environ['GKA_TRITON_ACC']
            os.environ['GKA_TRITON_WARPS'] = '8'
            row['warps8 fwd'] = kb.time_gka(*shape, 'fwd')
            row['warps8 fused fwdbwd'] = kb.time_gka(*shape, 'fwdbwd')
            del os.environ['GKA_TRITON_WARPS']
        print('quick', json.dumps(row), flush=True)
        rows.append(row)
    row = dict(shape='B1 T65536 H6 D64')
    for tile in ('32', '16'):
        os.environ['GKA_TRITON_STATE_TILE'] = tile
        row[f'state tile {tile} fwd'] = kb.time_gka(1, 65536, 6, 64, 'fwd')
    del os.environ['GKA_TRITON_STATE_TILE']
    print('quick', json.dumps(row), flush=True)
    rows.append(row)
    report['quick'] = rows


def section_bench(report):
    import kernels as kb
    rows = kb.main(['--out', OUT] + (['--quick'] if QUICK else []))
    report['bench'] = rows


def section_profile(report):
    import kernels as kb
    from gka_kernels import gka_chunk
    from torch.profiler import ProfilerActivity, profile
    lines = []
    for shape in ((16, 4096, 6, 64), (256, 196, 6, 64)):
        ins = kb.gka_inputs(*shape, requires_grad=True)
        do = torch.randn(*shape, device='cuda', dtype=torch.bfloat16)
        for _ in range(2):
            gka_chunk(*ins, backend='triton').backward(do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                gka_chunk(*ins, backend='triton').backward(do)
            torch.cuda.synchronize()
        lines.append(f'== {kb.shape_name(*shape)} fwd+bwd x3\n')
        lines.append(prof.key_averages().table(sort_by='cuda_time_total', row_limit=30, max_name_column_width=60))
    with open(os.path.join(OUT, 'profile.txt'), 'w') as fh:
        fh.write('\n'.join(lines))


def _table(rows) -> str:
    """A markdown table of dict rows sharing the first row's keys (floats to 3 significant digits)."""
    keys = list(rows[0].keys())
    lines = ['| ' + ' | '.join(keys) + ' |', '|---' * len(keys) + '|']
    lines += ['| ' + ' | '.join(f'{r.get(k):.3g}' if isinstance(r.get(k), float) else str(r.get(k)) for k in keys)
              + ' |' for r in rows]
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', default='tests,variants,bench,profile')
    ap.add_argument('--quick', action='store_true', help='benchmark: target shapes only (no T sweep, no plot)')
    ap.add_argument('--schedules', nargs='+', metavar='ENV',
                    help="schedule section: these instead of its list, each 'default' or NAME=value[,NAME=value] "
                         "(NAME as in ab.py: GKA_TRITON_ prefix optional), e.g. default DOT=lowp")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    if args.schedules:
        from ab import parse_variant
        SCHEDULES[:] = [parse_variant(v) for v in args.schedules]
    os.makedirs(OUT, exist_ok=True)
    import triton
    from provenance import provenance
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  **provenance())
    print(report, flush=True)
    for name in args.only.split(','):
        t0 = time.time()
        try:
            globals()[f'section_{name}'](report)
        except Exception as e:
            import traceback
            report[f'{name}_error'] = traceback.format_exc()[-3000:]
            print(f'section {name} failed: {e}', flush=True)
        print(f'section {name}: {time.time() - t0:.1f}s', flush=True)
        with open(os.path.join(OUT, 'check.json'), 'w') as fh:
            json.dump(report, fh, indent=1, default=str)
    md = [f"# GPU check: {report['device']}, torch {report['torch']}, triton {report['triton']}", '']
    if 'tests' in report:
        md += ['## tests', report['tests']['summary'], ''] + report['tests']['failures'] + ['']
        md += ['| case | ' + ' | '.join(('o', 'q', 'k', 'v', 'g', 'alpha', 'h_kk', 'h_kv')) + ' |', '|---' * 9 + '|']
        for fig in report['tests']['figures']:
            md.append(f"| {fig['case']} | " + ' | '.join(f"{fig['err'].get(k, float('nan')):.2e}"
                                                          for k in ('o', 'q', 'k', 'v', 'g', 'alpha', 'h_kk', 'h_kv'))
                      + ' |')
    for name, title in (('variants', 'variants (ms; err_o vs float64 at B4 T196 H6 D64)'),
                        ('schedule', 'iteration schedules (ms; errors vs float64 at B4 T196 H6 D64, bf16, N = 30)')):
        if name in report:
            md += ['', f'## {title}', '', _table(report[name])]
    if 'quick' in report:
        md += ['', '## quick checks', ''] + [json.dumps(r) for r in report['quick']]
    if 'bench' in report:
        import kernels as kb
        md += ['', '## benchmark', '', kb.markdown(report['bench'])]
    for k in report:
        if k.endswith('_error'):
            md += ['', f'## {k}', '```', report[k], '```']
    with open(os.path.join(OUT, 'check.md'), 'w') as fh:
        fh.write('\n'.join(md) + '\n')
    print('\n'.join(md))


if __name__ == '__main__':
    main()
