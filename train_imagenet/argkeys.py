"""The YAML keys timm's train.py accepts: the ``dest`` names of its argparse parser.

train.py turns every top-level key of ``--config x.yaml`` into a parser default without checking it, so
a misspelt key is silently ignored. ``configs/train_py_keys.txt`` keeps the valid names (made by this
module from the pinned train.py) and a test checks every config against it.

Regenerate after moving the pin::

    python -m train_imagenet.argkeys --timm-script /path/to/train.py > configs/train_py_keys.txt
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Set

from .locate import load_pin, locate_script, sha256_file

__all__ = ['train_py_dests', 'read_keys_file', 'format_keys_file', 'main']


def train_py_dests(path: Path) -> List[str]:
    """Sorted ``dest`` names of every option of train.py's ``config_parser`` and ``parser``.

    The script's module body is executed under a name other than ``__main__``: it builds its parsers
    and imports timm, but ``main()`` does not run.
    """
    namespace = runpy.run_path(str(path), run_name='_train_py_argkeys')
    dests: Set[str] = set()
    for parser_name in ('config_parser', 'parser'):
        parser = namespace.get(parser_name)
        if not isinstance(parser, argparse.ArgumentParser):
            raise RuntimeError(f'{path} defines no argparse parser named {parser_name!r}; is it timm\'s train.py?')
        dests.update(a.dest for a in parser._actions if a.dest not in (argparse.SUPPRESS, 'help'))
    return sorted(dests)


def format_keys_file(keys: Iterable[str], source: str, sha256: str) -> str:
    pin = load_pin()
    header = [
        "# argparse dest names of timm's train.py = the keys a --config YAML may use.",
        f'# Source: {source}',
        f'# SHA-256 of that train.py: {sha256}',
        f'# Pinned commit (train_imagenet/pinned.json): {pin.repo}@{pin.commit}',
        '# Regenerate: python -m train_imagenet.argkeys --timm-script /path/to/train.py > configs/train_py_keys.txt',
    ]
    return '\n'.join(header + list(keys)) + '\n'


def read_keys_file(path: Path) -> Set[str]:
    """The names in a keys file (comments and blank lines skipped)."""
    keys = set()
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            keys.add(line)
    return keys


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='python -m train_imagenet.argkeys', description=__doc__.splitlines()[0])
    ap.add_argument('--timm-script', default=None, help='train.py to read (default: located like the launcher)')
    args = ap.parse_args(argv)
    located = locate_script('train.py', explicit=args.timm_script)
    pin = load_pin()
    sha = sha256_file(located.path)
    source = f'{pin.repo}@{pin.commit}:train.py' if sha == pin.sha256['train.py'] else str(located.path)
    sys.stdout.write(format_keys_file(train_py_dests(located.path), source, sha))
    return 0


if __name__ == '__main__':
    sys.exit(main())
