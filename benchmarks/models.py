"""Whole-model efficiency: GKA backbones vs timm's DeiT (fused SDPA attention) across resolutions.

For every model and image size: images/s and peak activation memory for inference and for one training step
(fwd + bwd + AdamW, bf16 autocast). Timing: warm-up, then the median of CUDA-event-timed repeats. Activation memory
is the peak allocated during a step minus what was allocated before it (weights and inputs; for training also
gradients and AdamW state, which exist after the warm-up step). An out-of-memory is recorded, not raised.

    python benchmarks/models.py --out benchmarks/results            # GPU: the full table and plots
    python benchmarks/models.py --cpu --out benchmarks/results      # CPU inference at 224 px, batch 1
    python benchmarks/models.py --profile gka_small --img-size 1024 # where the time goes (kernel / proj / glue)
    python benchmarks/models.py --replot --merge A/models.json B/models.json --out DIR   # one table from two runs
    python benchmarks/models.py --models gka_small gka_small@num_iter=10 deit_small_patch16_224   # other arguments

A run cut short by its time budget can be completed by a later run of the missing models; ``--merge`` fills the
cells a run did not measure from earlier runs' JSON, marks them (†) and computes every GKA / DeiT ratio from
cells of one run only.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import gka_vision  # noqa: E402,F401  (registers the gka models)

GKA_MODELS = [f'gka_{s}{v}' for s in ('tiny', 'small', 'base') for v in ('', '_cross', '_alt')]
DEIT_MODELS = [f'deit_{s}_patch16_224' for s in ('tiny', 'small', 'base')]
# The pair the targets are stated for goes first, then the other sizes with their DeiT, then the scan variants, so
# a run cut short by --budget-s still has every ratio it can (the 2026-11-29 run reached 9 of 12 models in 265 s).
FIRST = ['gka_small', 'deit_small_patch16_224', 'gka_tiny', 'deit_tiny_patch16_224', 'gka_base',
         'deit_base_patch16_224']
SIZES = (224, 512, 1024, 2048, 4096)
INFER_BATCH = {224: 256, 512: 64, 1024: 16, 2048: 4, 4096: 1}
TRAIN_BATCH = {224: 128, 512: 32, 1024: 8, 2048: 2, 4096: 1}


def model_spec(spec: str) -> Tuple[str, Dict]:
    """'name' or 'name@key=value[,key=value]' (values as Python literals): a registered model built with other
    arguments, e.g. gka_small@num_iter=10, timed beside the default in the same run. The key ``compile`` is not a
    model argument: the model is run through torch.compile with that mode (a bare word: default, reduce-overhead,
    max-autotune-no-cudagraphs), e.g. gka_small@compile=reduce-overhead."""
    name, _, extra = spec.partition('@')
    kwargs = {}
    for item in filter(None, extra.split(',')):
        key, eq, value = item.partition('=')
        if not eq or not key.isidentifier():
            raise SystemExit(f'model spec {spec!r}: expected name@key=value[,key=value]')
        if key == 'compile':
            kwargs[key] = value
            continue
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f'model spec {spec!r}: {value!r} is not a Python literal') from None
    return name, kwargs


def build(spec: str, img_size: int, device, compile_mode: Optional[str] = None):
    """The model of ``spec``; compiled when the spec or ``compile_mode`` names a torch.compile mode ('default' is
    torch's default; the spec's wins)."""
    name, kwargs = model_spec(spec)
    compile_mode = kwargs.pop('compile', compile_mode)
    model = timm.create_model(name, img_size=img_size, num_classes=1000, **kwargs).to(device)
    if compile_mode is None:
        return model
    # static shapes: one size per model here, and a fresh cache so an earlier model's graphs count for nothing
    torch._dynamo.reset()
    return torch.compile(model, mode=None if compile_mode == 'default' else compile_mode, dynamic=False)


def _time_cuda(fn, warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _step_fn(model, batch: int, img_size: int, mode: str, device):
    """One benchmarked step on random images: a bf16-autocast inference forward, or a training step (fwd, cross
    entropy on random labels, bwd, fused AdamW)."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
                model(x)
        return step
    model.train()
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(name: str, img_size: int, batch: int, mode: str, device, warmup: int, repeats: int,
            compile_mode: Optional[str]) -> Dict:
    row = dict(model=name, img_size=img_size, batch=batch, mode=mode)
    model = step = None
    try:
        torch.cuda.empty_cache()
        model = build(name, img_size, device, compile_mode)
        step = _step_fn(model, batch, img_size, mode, device)
        step()  # first call: compilation, optimizer state
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row['act_gib'] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        times = _time_cuda(step, warmup, repeats)
        row['ms'] = statistics.median(times) * 1e3
        row['img_s'] = batch / statistics.median(times)
    except torch.cuda.OutOfMemoryError:
        row['oom'] = True
    finally:
        model = step = None  # drop the references before freeing the cache
        torch.cuda.empty_cache()
    return row


def measure_cpu(name: str, repeats: int) -> Dict:
    model = build(name, 224, 'cpu').eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return dict(model=name, img_size=224, batch=1, mode='infer-cpu', ms=ms, img_s=1e3 / ms)


def _bucket(key: str) -> str:
    key = key.lower()
    if 'gka' in key or key.startswith(('_chunk_', '_bwd_', '_scan_increments', '_decode')):
        return 'gka kernels'
    if any(s in key for s in ('gemm', 'sm90', 'cutlass', 'matmul', 'nvjet')):
        return 'matmul (projections, MLP)'
    return 'other (glue, norms, conv)'


def profile(name: str, img_size: int, batch: int, device, mode: str = 'infer') -> Dict:
    """Splits one inference forward's (or one training step's) CUDA time into the GKA kernels, the projections
    (matmuls) and the rest, and keeps the top kernels by time. Also the step's wall time (CUDA events) and the host
    time to issue it from an idle GPU: kernel time well under the wall time means the GPU waits for the host."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step = _step_fn(build(name, img_size, device), batch, img_size, mode, device)
    wall = statistics.median(_time_cuda(step, 3, 5)) * 1e3
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    loop = _loop(step)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    buckets = {'gka kernels': 0.0, 'matmul (projections, MLP)': 0.0, 'other (glue, norms, conv)': 0.0}
    kernels = []
    for ev in prof.key_averages():
        t = ev.device_time_total if hasattr(ev, 'device_time_total') else ev.cuda_time_total
        if t <= 0:
            continue
        buckets[_bucket(ev.key)] += t
        kernels.append((t, ev.count, ev.key[:110]))
    total = sum(buckets.values()) or 1.0
    top = [dict(ms=round(t / 1e3, 3), pct=round(100 * t / total, 1), calls=n, kernel=k)
           for t, n, k in sorted(kernels, reverse=True)[:30]]
    return dict(model=name, img_size=img_size, batch=batch, mode=mode, total_ms=round(total / 1e3, 3),
                wall_ms=round(wall, 3), host_issue_ms=round(statistics.median(host), 3),
                gpu_busy_pct=round(100 * total / 1e3 / wall, 1), **loop,
                split_pct={k: round(100 * v / total, 1) for k, v in buckets.items()}, top=top,
                **{f'host_{k}': v for k, v in _host_ops(step).items()})


def _loop(step, n: int = 20) -> Dict:
    """Steps issued back to back, as a data loop issues them (the sweep's timing synchronises after each step): ms
    per step from CUDA events around n steps, the host's median time per step inside the loop, and the same with
    Python's garbage collector off."""
    import gc
    out = {}
    for tag, collect in (('', True), ('_nogc', False)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        if not collect:
            gc.disable()
        try:
            host = []
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
        finally:
            gc.enable()
        out[f'loop{tag}_ms'] = round(start.elapsed_time(end) / n, 3)
        out[f'loop{tag}_host_ms'] = round(statistics.median(host), 3)
    return out


def _host_ops(step) -> Dict:
    """Where the host's issue time goes: the CPU-side ops and CUDA runtime calls of one step by self CPU time (the
    profiler's own overhead inflates every op alike), to compare two models whose host times differ; and every
    operation that synchronises the host with the GPU (torch's sync debug mode), with the Python line that asked for
    it, since one sync per block makes the host wait for the GPU and looks like host time."""
    import traceback
    import warnings
    from torch.profiler import ProfilerActivity, profile as torch_profile

    def top_ops(steps: int, n: int) -> List[Dict]:
        # per step: from an idle GPU (steps = 1), or issued back to back while the GPU runs the previous step
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
        torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
        return [dict(self_ms=round(e.self_cpu_time_total / steps / 1e3, 3), calls=e.count // steps, op=e.key[:110])
                for e in rows]

    top, loop_top = top_ops(1, 30), top_ops(3, 20)
    syncs: Dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if 'synchroniz' not in str(message) or 'prototype' in str(message):   # the mode's own notice
            return
        frames = [f for f in traceback.extract_stack()[:-1] if 'warnings' not in f.filename][-4:]
        where = ' <- '.join(f'{pathlib.Path(f.filename).name}:{f.lineno} {f.name}' for f in reversed(frames))
        key = f'{str(message)[:60]} @ {where}'
        syncs[key] = syncs.get(key, 0) + 1

    probe = torch.ones(1, device='cuda')
    torch.cuda.synchronize()
    with warnings.catch_warnings():   # restores warnings.showwarning on exit
        warnings.simplefilter('always')
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            probe.item()   # a known sync: the detector must report it, or its silence below means nothing
            detected = bool(syncs)
            syncs.clear()
            step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    return dict(ops=top, loop_ops=loop_top, sync_probe_detected=detected,
                syncs=[dict(calls=n, where=k) for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])])


def markdown(rows: List[Dict], mode: str) -> str:
    models = list(dict.fromkeys(r['model'] for r in rows if r['mode'] == mode))
    sizes = sorted({r['img_size'] for r in rows if r['mode'] == mode})
    unit = '(ms per batch)' if mode == 'infer-cpu' else '(act GiB)'
    head = '| model | ' + ' | '.join(f'{s} px img/s {unit}' for s in sizes) + ' |'
    lines = [head, '|' + '---|' * (len(sizes) + 1)]
    for m in models:
        cells = []
        for s in sizes:
            r = next((r for r in rows if r['model'] == m and r['img_size'] == s and r['mode'] == mode), None)
            if r is None:
                cells.append('–')
            elif r.get('oom'):
                cells.append('OOM')
            elif r.get('skipped'):
                cells.append('not run')
            elif 'act_gib' in r:
                cells.append(f"{r['img_s']:,.1f} ({r['act_gib']:.2f})" + ('†' if r.get('run') else ''))
            else:
                cells.append(f"{r['img_s']:,.1f} ({r['ms']:.1f} ms)" + ('†' if r.get('run') else ''))
        lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
    runs = sorted({r['run'] for r in rows if r.get('run') and r['mode'] == mode})
    if runs:
        lines += ['', '† measured in an earlier run: ' + ', '.join(runs)]
    return '\n'.join(lines)


def ratios(rows: List[Dict], mode: str) -> str:
    """GKA / DeiT throughput and memory ratios for equal widths."""
    out = [f'| {mode}: GKA / DeiT | ' + ' | '.join(f'{s} px' for s in SIZES) + ' |', '|' + '---|' * (len(SIZES) + 1)]
    for size in ('tiny', 'small', 'base'):
        for v in ('', '_cross', '_alt'):
            cells = []
            for s in SIZES:
                a = next((r for r in rows if r['model'] == f'gka_{size}{v}' and r['img_size'] == s
                          and r['mode'] == mode and 'img_s' in r), None)
                b = next((r for r in rows if r['model'] == f'deit_{size}_patch16_224' and r['img_size'] == s
                          and r['mode'] == mode and 'img_s' in r and r.get('run') == a.get('run')), None) \
                    if a else None   # a ratio only within one run: absolute speeds drift between machines
                cells.append(f"{a['img_s'] / b['img_s']:.2f}× / mem {a['act_gib'] / b['act_gib']:.2f}×"
                             if a and b else '–')
            out.append(f'| gka_{size}{v} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def plot(rows: List[Dict], mode: str, path: pathlib.Path, title: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {'tiny': 'tab:blue', 'small': 'tab:orange', 'base': 'tab:green'}
    for m in dict.fromkeys(r['model'] for r in rows if r['mode'] == mode):
        first = {}   # one point per size: this run's, else the first merged run's
        for r in rows:
            if r['model'] == m and r['mode'] == mode and 'img_s' in r:
                first.setdefault(r['img_size'], (r['img_size'], r['img_s'], r['act_gib']))
        pts = sorted(first.values())
        if not pts:
            continue
        size = next(s for s in colors if s in m)
        style = '--' if m.startswith('deit') else ('-' if m.count('_') == 1 else (':' if 'cross' in m else '-.'))
        kw = dict(color=colors[size], linestyle=style, marker='o' if m.startswith('gka') else 's', label=m)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    for ax, label in ((ax1, 'images / s'), (ax2, 'peak activation memory (GiB)')):
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('image size (px)')
        ax.set_ylabel(label)
        ax.set_xticks(SIZES, [str(s) for s in SIZES])
        ax.grid(True, which='both', alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge_rows(rows: List[Dict], files: List[str]) -> List[Dict]:
    """This run's rows, then every measured row of the earlier runs in ``files`` (labelled with their run), minus
    this run's 'not run' rows for cells an earlier run measured. Tables show the first row of a cell."""
    merged = []
    for f in files:
        label = pathlib.Path(f).parent.name or f
        merged += [dict(r, run=r.get('run') or label) for r in json.loads(pathlib.Path(f).read_text())['rows']
                   if not r.get('skipped')]
    filled = {(r['model'], r['img_size'], r['mode']) for r in merged}
    return [r for r in rows if not (r.get('skipped') and (r['model'], r['img_size'], r['mode']) in filled)] + merged


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='benchmarks/results')
    p.add_argument('--models', nargs='*', default=FIRST + [m for m in GKA_MODELS + DEIT_MODELS if m not in FIRST])
    p.add_argument('--budget-s', type=float, default=270.0,
                   help='stop measuring after this many seconds (later cells are recorded as skipped)')
    p.add_argument('--sizes', nargs='*', type=int, default=list(SIZES))
    p.add_argument('--modes', nargs='*', default=['infer', 'train'], choices=['infer', 'train'])
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                   help="torch.compile each model first, in this mode (default: torch's default mode)")
    p.add_argument('--cpu', action='store_true', help='CPU inference at 224 px, batch 1')
    p.add_argument('--profile', metavar='MODEL', help='profile one model at --img-size instead of the sweep')
    p.add_argument('--img-size', type=int, default=1024)
    p.add_argument('--merge', nargs='*', default=[], metavar='JSON',
                   help="earlier runs' models.json: their measured cells fill the cells this run did not measure")
    p.add_argument('--replot', action='store_true',
                   help='measure nothing: tables and plots from the first --merge file, completed by the others')
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.profile:
        batches = dict(infer=INFER_BATCH, train=TRAIN_BATCH)
        res = [profile(args.profile, args.img_size, batches[mode].get(args.img_size, 1), 'cuda', mode)
               for mode in args.modes]
        print(json.dumps(res, indent=1))
        (out / f'profile_{args.profile}_{args.img_size}.json').write_text(json.dumps(res, indent=1))
        return
    from provenance import provenance
    env = dict(torch=torch.__version__, timm=timm.__version__, backend=os.environ.get('GKA_BACKEND', 'default'),
               **provenance())
    if args.cpu:
        torch.set_num_threads(os.cpu_count() or 1)
        rows = [measure_cpu(m, args.repeats) for m in args.models]
        env.update(device=f'CPU ({os.cpu_count()} cores)', threads=torch.get_num_threads())
        table = markdown(rows, 'infer-cpu')
        (out / 'models_cpu.json').write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        (out / 'models_cpu.md').write_text(table + '\n')
        print(env)
        print(table)
        return

    rows = []
    if args.replot:
        if not args.merge:
            p.error('--replot needs --merge files')
        first = json.loads(pathlib.Path(args.merge[0]).read_text())   # the main run: its cells unmarked
        env, rows, args.merge = first['env'], first['rows'], args.merge[1:]
    else:
        import triton
        env.update(device=torch.cuda.get_device_name(), triton=triton.__version__, compile=args.compile)
    t_start = time.time()
    for m in ([] if args.replot else args.models):
        for mode in args.modes:
            batches = INFER_BATCH if mode == 'infer' else TRAIN_BATCH
            for s in args.sizes:
                t0 = time.time()
                if t0 - t_start > args.budget_s:
                    rows.append(dict(model=m, img_size=s, batch=batches[s], mode=mode, skipped='time budget'))
                    continue
                r = measure(m, s, batches[s], mode, 'cuda', args.warmup, args.repeats, args.compile)
                rows.append(r)
                print(f"{mode:5s} {m:24s} {s:5d}px bs{batches[s]:<4d} "
                      + ('OOM' if r.get('oom') else f"{r['img_s']:10.1f} img/s  act {r['act_gib']:.2f} GiB")
                      + f'  ({time.time() - t0:.1f}s)', flush=True)
                (out / 'models.json').write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    rows = merge_rows(rows, args.merge)
    (out / 'models.json').write_text(json.dumps(dict(env=env, rows=rows, merged=args.merge), indent=1))
    md = [f"Environment: {env}", '']
    for mode in args.modes:
        md += [f'### {mode}', '', markdown(rows, mode), '', ratios(rows, mode), '']
        plot(rows, mode, out / f'models_{mode}.png', f"{mode} — {env['device']}, bf16, torch {env['torch']}")
    (out / 'models.md').write_text('\n'.join(md))
    print('\n'.join(md))


if __name__ == '__main__':
    main()
