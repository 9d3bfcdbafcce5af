"""What produced a benchmark result: the code (a digest of the package sources, and the git commit where the
checkout has one; the GPU machine gets a copy of the tree without .git) and every GKA_* switch that was set."""
from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
from typing import Dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ('kernels', 'gka_vision')


def source_digest() -> str:
    h = hashlib.sha256()
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob('*.py')):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return out.stdout.strip() if out.returncode == 0 else 'unknown'


def provenance() -> Dict:
    return dict(source_digest=source_digest(), commit=git_commit(),
                switches={k: v for k, v in sorted(os.environ.items()) if k.startswith('GKA_')})
