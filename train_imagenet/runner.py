"""Run a timm script (train.py / validate.py) in this process with our models registered."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

__all__ = ['run_script']


def run_script(path: Path, argv: Sequence[str]) -> None:
    """Execute ``path`` as ``__main__`` with ``sys.argv = [path, *argv]``; ``sys.argv`` is restored afterwards.

    ``gka_vision`` is imported first so that ``--model gka_*`` resolves in timm's registry. Nothing
    else is touched: under torchrun the RANK / WORLD_SIZE / LOCAL_RANK variables reach train.py as set.
    ``SystemExit`` from the script (argparse errors, ``--help``) propagates to the caller.
    """
    import gka_vision  # noqa: F401  (registers the gka_* models with timm)

    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name='__main__')
    finally:
        sys.argv = saved
