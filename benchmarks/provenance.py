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


def _git(*args: str):
    try:
        out = subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD, with '+dirty' when the package sources differ from it: a copied tree may carry an older .git (the GPU
    machine's copy recorded the session's first commit), so a bare hash would name code that did not run."""
    head = _git('rev-parse', '--short=12', 'HEAD')
    if head is None:
        return 'unknown'
    changed = _git('status', '--porcelain', '--', *SOURCES)
    return head + ('+dirty' if changed is None or changed else '')


def provenance() -> Dict:
    return dict(source_digest=source_digest(), commit=git_commit(),
                switches={k: v for k, v in sorted(os.environ.items()) if k.startswith('GKA_')})
