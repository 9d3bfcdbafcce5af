"""``python -m train_imagenet --demo``: train a GKA model on the digits set through timm's train.py.

The data are built once (:mod:`train_imagenet.demo_data`), the recipe is ``configs/gka_tiny_digits.yaml``
and train.py does the training, printing its progress. The last line is the result, read from the
run's ``summary.csv``. Any train.py flag given after ``--demo`` overrides the config (``--epochs 3``,
``--device cuda``, ``--resume ...``).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

from .demo_data import build_digits_imagefolder
from .locate import cache_dir, locate_script
from .runner import run_script

__all__ = ['DemoResult', 'demo_config_path', 'read_summary', 'demo_train_args', 'run_demo']

DEMO_CONFIG = 'gka_tiny_digits.yaml'


@dataclass(frozen=True)
class DemoResult:
    epochs: int
    last_top1: float
    best_top1: float
    best_epoch: int
    finite: bool


def demo_config_path() -> Path:
    """``configs/gka_tiny_digits.yaml`` of the source tree (the launcher lives beside ``configs/``), else the copy a
    wheel install puts under ``<prefix>/share/gka-vision/configs``."""
    candidates = [
        Path(__file__).resolve().parent.parent / 'configs' / DEMO_CONFIG,
        Path.cwd() / 'configs' / DEMO_CONFIG,
        Path(sys.prefix) / 'share' / 'gka-vision' / 'configs' / DEMO_CONFIG,
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f'{DEMO_CONFIG} not found (looked in {", ".join(str(c.parent) for c in candidates)}); run from a checkout of '
        f'gka-vision or pass --config PATH/{DEMO_CONFIG}'
    )


def default_demo_dir() -> Path:
    return cache_dir().parent / 'demo'


def read_summary(path: Path) -> DemoResult:
    """Parse train.py's ``summary.csv`` (a resumed run repeats the header line; those rows are skipped)."""
    rows = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            if row.get('epoch', '').isdigit():
                rows.append(row)
    if not rows:
        raise RuntimeError(f'{path} holds no finished epoch')
    if 'eval_top1' not in rows[-1]:
        raise RuntimeError(f'{path} has no eval_top1 column: did the run evaluate (is there a validation split)?')
    top1 = [float(r['eval_top1']) for r in rows]
    losses = [float(r[k]) for r in rows for k in ('train_loss', 'eval_loss') if k in r]
    best = max(range(len(rows)), key=lambda i: top1[i])
    return DemoResult(
        epochs=int(rows[-1]['epoch']) + 1,
        last_top1=top1[-1],
        best_top1=top1[best],
        best_epoch=int(rows[best]['epoch']),
        finite=all(math.isfinite(v) for v in losses + top1),
    )


def _output_dir(rest: Sequence[str], default_output: Path, default_experiment: str) -> Path:
    # train.py joins --output and --experiment; the demo needs the same folder to read summary.csv.
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument('--output', default=str(default_output))
    ap.add_argument('--experiment', default=default_experiment)
    known, _ = ap.parse_known_args(list(rest))
    return Path(known.output) / known.experiment


def demo_train_args(data_dir: Path, run_dir: Path, rest: Sequence[str], device: Optional[str] = None) -> List[str]:
    """train.py arguments of the demo; the caller's ``rest`` comes last, so it overrides ours."""
    if device is None:
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = ['--config', str(demo_config_path())] if '--config' not in rest and '-c' not in rest else []
    args += [
        '--data-dir', str(data_dir),
        '--device', device,
        '--output', str(run_dir.parent),
        '--experiment', run_dir.name,
    ]
    return args + list(rest)


def run_demo(rest: Sequence[str], demo_dir: Optional[str] = None, timm_script: Optional[str] = None) -> int:
    """Build the digits set (once), train on it through train.py, print one result line; 0 on success."""
    from .cli import describe_script, note

    root = Path(demo_dir).expanduser() if demo_dir else default_demo_dir()
    located = locate_script('train.py', explicit=timm_script)
    describe_script(located)
    try:
        info = build_digits_imagefolder(root / 'digits32')
    except ImportError as e:  # scikit-learn missing: one line, not a traceback
        print(f'train_imagenet: {e}', file=sys.stderr)
        return 2
    note(f'digits ImageFolder at {info.root}: {info.num_train} train / {info.num_val} validation images')

    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    run_dir = _output_dir(rest, root / 'runs', f'digits-{stamp}-{os.getpid()}')
    args = demo_train_args(Path(info.root), run_dir, rest)
    note('train.py ' + ' '.join(args))
    t0 = time.perf_counter()
    run_script(located.path, args)
    wall = time.perf_counter() - t0

    if os.environ.get('RANK', '0') not in ('', '0'):
        return 0
    summary = run_dir / 'summary.csv'
    if not summary.is_file():
        print(f'demo result: no {summary} was written (train.py stopped before finishing an epoch)')
        return 1
    res = read_summary(summary)
    line = (
        f'demo result: validation top-1 {res.last_top1:.2f} % after {res.epochs} epochs '
        f'(best {res.best_top1:.2f} % at epoch {res.best_epoch}), {wall:.0f} s wall; run folder {run_dir}'
    )
    if not res.finite:
        print(line + ' -- FAILED: a loss or accuracy is NaN/inf')
        return 1
    print(line)
    return 0
