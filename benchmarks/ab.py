"""Interleaved A/B timing of kernel switches (GKA_TRITON_* variables) on the GPU.

Separate runs of one variant after another drift by ~10 % on the H200 (the same default measured 1.74 and 1.93 ms
in two stages of one call, 2026-11-29), more than most kernel changes gain. Here every variant runs in every round,
in rotated order, on the same inputs and the same model, and the report is each variant's median over the rounds
and its ratio to the first variant with the range of the per-round ratios (whole models: also each variant's
peak activation memory). The switches are read at each call (gka_kernels.triton.config / solve / state_pass), so
one process can alternate them.

    python benchmarks/ab.py --variants default STATE_PAIR=0 --out /tmp/ab
    python benchmarks/ab.py --variants default FAST_ITERS=17 --models gka_small --sizes 224 --modes infer
    python benchmarks/ab.py --specs gka_small gka_small@compile=reduce-overhead --sizes 224 --modes train
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402

KERNEL_SHAPES = ['256,196,6,64', '16,4096,6,64', '4,4096,16,128']
# Switches that the model code reads while dynamo traces it (GKA_TRITON_* are read by the kernels' launches, which
# run inside the opaque ops at every call, and GKA_COMPILE_CORE when a model is built).
TRACED_SWITCHES = {'GKA_BACKEND', 'GKA_CAST_FANOUT', 'GKA_FUSED_GLUE', 'GKA_FUSED_NORM', 'GKA_PATCH_GEMM',
                   'GKA_REBUILD_QKV'}


def parse_variant(text: str) -> Dict[str, str]:
    """'default' or 'NAME=value[,NAME=value]' with NAME a GKA_TRITON_ switch, its prefix optional."""
    if text == 'default':
        return {}
    env = {}
    for item in text.split(','):
        name, sep, value = item.partition('=')
        if not sep or not name:
            raise SystemExit(f'--variants: expected default or NAME=value[,NAME=value], got {text!r}')
        env[name if name.startswith('GKA_') else 'GKA_TRITON_' + name] = value
    return env


def parse_specs(texts: List[str]):
    """``SPEC[%NAME=value,...]`` → (models.py specs, one switch dict per spec). A spec's switches hold while its
    model is built and around every call of its step, the first (where torch.compile traces) included. Dynamo does
    not guard on os.environ, so a switch read by traced code would be baked into the first compiled model's graphs
    and reused by the next: such switches are refused on compiled specs (GKA_COMPILE_CORE is read at build time)."""
    split = [text.partition('%') for text in texts]
    specs = [spec for spec, _, _ in split]
    variants = [parse_variant(env) if env else {} for _, _, env in split]
    for spec, env in zip(specs, variants):
        baked = sorted(set(env) & TRACED_SWITCHES)
        if baked and 'compile=' in spec:
            raise SystemExit(f'{spec}: {baked} are read by code that torch.compile traces, and dynamo does not '
                             "guard on os.environ, so every compiled spec would run the first one's graphs; "
                             'time them in separate runs')
    return specs, variants


class Switch:
    """Sets one variant's variables, and restores the environment on exit."""

    def __init__(self, env: Dict[str, str]):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _time(fn: Callable[[], object], iters: int) -> float:
    """Mean ms per call over iters back-to-back calls, CUDA events around the whole run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _per_variant(step, variants):
    """One step per variant: ``step`` is one callable for all, or a list of them (one model per variant)."""
    return step if isinstance(step, list) else [step] * len(variants)


def peak_gib(step, variants: List[Dict[str, str]]) -> List[float]:
    """Peak memory of one call of step above what was allocated before it, per variant (GiB): the activation
    memory for a model step, as benchmarks/models.py measures it."""
    out = []
    for step, env in zip(_per_variant(step, variants), variants):
        with Switch(env):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            out.append((torch.cuda.max_memory_allocated() - base) / 2 ** 30)
    return out


def interleave(step, variants: List[Dict[str, str]], rounds: int, iters: int,
               warmup: int = 3) -> List[List[float]]:
    """ms per call of step under each variant, one list of rounds per variant (rotated order each round). step:
    one callable, or one per variant."""
    steps = _per_variant(step, variants)
    for fn, env in zip(steps, variants):   # compile each variant's kernels before any timing
        with Switch(env):
            for _ in range(warmup):
                fn()
    torch.cuda.synchronize()
    times = [[] for _ in variants]
    for r in range(rounds):
        order = [(r + i) % len(variants) for i in range(len(variants))]
        for i in order:
            with Switch(variants[i]):
                steps[i]()   # one untimed call after the switch
                times[i].append(_time(steps[i], iters))
    return times


def summarise(case: str, names: List[str], times: List[List[float]],
              mem_gib: Optional[List[float]] = None) -> List[Dict]:
    rows = []
    for i, (name, ts) in enumerate(zip(names, times)):
        per_round = [t / b for t, b in zip(ts, times[0])]
        row = dict(case=case, variant=name, ms=statistics.median(ts), ratio=statistics.median(per_round),
                   ratio_min=min(per_round), ratio_max=max(per_round), rounds=len(ts))
        if mem_gib is not None:
            row['act_gib'] = mem_gib[i]
        rows.append(row)
    return rows


def kernel_step(shape: str, mode: str) -> Callable[[], object]:
    import kernels as kb
    from gka_kernels import gka_chunk
    B, T, H, D = (int(x) for x in shape.split(','))
    ins = kb.gka_inputs(B, T, H, D, requires_grad=mode == 'fwdbwd')
    if mode == 'fwd':
        def step():
            with torch.no_grad():
                gka_chunk(*ins, num_iter=30, backend='triton')
        return step
    do = torch.randn(B, T, H, D, device='cuda', dtype=torch.bfloat16)

    def step():
        for t in ins:
            t.grad = None
        gka_chunk(*ins, num_iter=30, backend='triton').backward(do)
    return step


def markdown(rows: List[Dict]) -> str:
    out = ['| case | variant | ms (median) | ratio to first | per-round range | act. GiB |',
           '|---|---|---|---|---|---|']
    for r in rows:
        mem = f"{r['act_gib']:.2f}" if 'act_gib' in r else '-'
        out.append(f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['ratio']:.3f} | "
                   f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {mem} |")
    return '\n'.join(out) + '\n'


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variants', nargs='+', default=['default', 'STATE_PAIR=0'],
                   help="'default' or NAME=value[,NAME=value] (GKA_TRITON_ optional); the first is the baseline")
    p.add_argument('--shapes', nargs='*', default=KERNEL_SHAPES, help='kernel shapes B,T,H,D (none: skip)')
    p.add_argument('--kernel-modes', nargs='+', default=['fwd', 'fwdbwd'], choices=['fwd', 'fwdbwd'])
    p.add_argument('--models', nargs='*', default=[], help='timm model names timed whole (none: skip)')
    p.add_argument('--specs', nargs='*', default=[],
                   help="instead of --variants: models.py specs timed against each other, the first the baseline, "
                        "e.g. gka_small gka_small@compile=reduce-overhead (one model each); SPEC%%NAME=value[,...] "
                        "runs that spec under those switches, e.g. gka_small@compile=default%%GKA_COMPILE_CORE=1")
    p.add_argument('--sizes', nargs='+', type=int, default=[224, 1024])
    p.add_argument('--modes', nargs='+', default=['infer'], choices=['infer', 'train'])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--out', default='benchmarks/results/ab')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('ab.py times CUDA kernels: no GPU here')
    variants = [parse_variant(v) for v in args.variants]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict] = []

    names, specs = args.variants, []
    if args.specs:
        names = args.specs
        specs, variants = parse_specs(args.specs)

    def record(case, step, memory=False):
        times = interleave(step, variants, args.rounds, args.iters)
        new = summarise(case, names, times, peak_gib(step, variants) if memory else None)
        for r in new:
            print(json.dumps(r), flush=True)
        rows.extend(new)

    for shape in ([] if specs else args.shapes):
        for mode in args.kernel_modes:
            if mode == 'fwdbwd' and shape.endswith(',128') and 'fwd' in args.kernel_modes:
                continue   # the D = 128 target is the forward's
            record(f"gka_chunk {shape.replace(',', ' ')} {mode}", kernel_step(shape, mode))
    if specs:
        import models as mb
        for size in args.sizes:
            for mode in args.modes:
                batch = (mb.INFER_BATCH if mode == 'infer' else mb.TRAIN_BATCH)[size]
                built = []
                for spec, env in zip(specs, variants):
                    with Switch(env):   # switches read when the model is built (GKA_COMPILE_CORE) hold here too
                        built.append(mb.build(spec, size, 'cuda'))
                steps = [mb._step_fn(m, batch, size, mode, 'cuda') for m in built]
                record(f'{size}px b{batch} {mode}', steps, memory=True)
                del built, steps
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    if args.models and not specs:
        import models as mb
        for name in args.models:
            for size in args.sizes:
                for mode in args.modes:
                    batch = (mb.INFER_BATCH if mode == 'infer' else mb.TRAIN_BATCH)[size]
                    model = mb.build(name, size, 'cuda')
                    record(f'{name} {size}px b{batch} {mode}', mb._step_fn(model, batch, size, mode, 'cuda'),
                           memory=True)
                    del model
                    torch.cuda.empty_cache()
    env = provenance()
    env['device'] = torch.cuda.get_device_name()
    (out / 'ab.json').write_text(json.dumps(dict(env=env, variants=args.variants, rows=rows), indent=1))
    md = f'Environment: {env}\n\n' + markdown(rows)
    (out / 'ab.md').write_text(md)
    print(md)


if __name__ == '__main__':
    main()
