"""Command line of ``python -m train_imagenet``: a thin front of timm's train.py / validate.py.

Only the launcher's own options are taken out of the argument list; everything else reaches timm's
script untouched and in order, so every train.py / validate.py flag (and ``--config x.yaml``) works.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from .locate import LocatedScript, ScriptIntegrityError, ScriptNotFoundError, load_pin, locate_script
from .runner import run_script

__all__ = ['USAGE', 'split_launcher_args', 'main']

USAGE = """\
usage: python -m train_imagenet [--timm-script PATH] [train.py arguments ...]
       python -m train_imagenet validate [--timm-script PATH] [validate.py arguments ...]
       python -m train_imagenet --demo [--demo-dir DIR] [--timm-script PATH] [train.py arguments ...]
       torchrun --nproc_per_node N -m train_imagenet [train.py arguments ...]

Runs timm's train.py (or validate.py) in this process with the gka_* models registered.
Launcher options (all other arguments go to timm's script as they are):
  validate            first word: run validate.py instead of train.py
  --timm-script PATH  the script to run; else $TIMM_TRAIN_SCRIPT / $TIMM_VALIDATE_SCRIPT, else the cached
                      copy of the pinned commit, else a verified download of it
  --demo              build the digits demo set (scikit-learn) and train gka_tiny on it with
                      configs/gka_tiny_digits.yaml; ends with one line giving the validation top-1
  --demo-dir DIR      where the demo keeps its data and runs (default: the gka_vision cache folder)
Example: python -m train_imagenet --config configs/gka_small_in1k.yaml --data-dir /data/imagenet
"""


def split_launcher_args(argv: Sequence[str]) -> Tuple[str, dict, List[str]]:
    """Separate the launcher's options from the script's arguments.

    Returns:
        ``(mode, options, rest)``: mode is 'train' or 'validate'; options holds ``timm_script``, ``demo``,
        ``demo_dir`` and ``help``; rest is what the script receives, in the caller's order.
    """
    argv = list(argv)
    mode = 'train'
    if argv and argv[0] == 'validate':
        mode, argv = 'validate', argv[1:]
    opts = dict(timm_script=None, demo=False, demo_dir=None, help=False)
    rest: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition('=')
        if key in ('--timm-script', '--demo-dir'):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith('-'):
                    raise SystemExit(f'train_imagenet: {key} expects a path\n\n{USAGE}')
                value = argv[i + 1]
                i += 1
            opts[key[2:].replace('-', '_')] = value
        elif arg == '--demo':
            opts['demo'] = True
        else:
            if arg in ('-h', '--help'):
                opts['help'] = True
            rest.append(arg)
        i += 1
    if opts['demo'] and mode != 'train':
        raise SystemExit(f'train_imagenet: --demo trains; it cannot be combined with validate\n\n{USAGE}')
    if opts['demo_dir'] and not opts['demo']:
        raise SystemExit(f'train_imagenet: --demo-dir only applies with --demo\n\n{USAGE}')
    return mode, opts, rest


def _is_primary() -> bool:
    return os.environ.get('RANK', '0') in ('', '0')


def note(msg: str) -> None:
    """A launcher message on stderr, once per job (rank 0 only under torchrun)."""
    if _is_primary():
        print(f'train_imagenet: {msg}', file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m train_imagenet``; returns the exit status (2: no usable script)."""
    argv = sys.argv[1:] if argv is None else argv
    mode, opts, rest = split_launcher_args(argv)
    if opts['help']:
        print(USAGE)
        print(f'--- options of timm\'s {mode}.py follow ---', flush=True)
    script_name = f'{mode}.py'
    try:
        if opts['demo'] and not opts['help']:  # --demo --help shows train.py's options without building data
            # The demo usually trains on a CPU, often a small shared one. OpenMP's default busy-waiting makes a
            # 2-thread step ~10-30x slower as soon as other processes compete for the cores (measured: 16-50 s
            # instead of 0.6-1.8 s per step); sleeping waiters cost nothing when the cores are free. It only takes
            # effect if set before torch loads its OpenMP runtime, which happens later in this process.
            os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
            from .demo import run_demo
            return run_demo(rest, demo_dir=opts['demo_dir'], timm_script=opts['timm_script'])
        located = locate_script(script_name, explicit=opts['timm_script'])
    except (ScriptNotFoundError, ScriptIntegrityError) as e:
        print(f'train_imagenet: {e}', file=sys.stderr)
        return 2
    describe_script(located)
    run_script(located.path, rest)
    return 0


def describe_script(located: LocatedScript) -> None:
    """Say which script runs, and whether it is the pinned one."""
    pin = load_pin()
    if located.matches_pin:
        note(f'running {located.name} from {located.path} ({located.source}; pytorch-image-models @ {pin.short})')
    else:
        note(
            f'running {located.name} from {located.path} ({located.source}); it differs from the pinned '
            f'pytorch-image-models @ {pin.short} that the configs were checked against'
        )
