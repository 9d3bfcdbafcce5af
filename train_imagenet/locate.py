"""Find timm's train.py / validate.py without ever shipping them in this repository.

Resolution order (first hit wins):

1. an explicit path (``--timm-script PATH``);
2. the environment: ``TIMM_TRAIN_SCRIPT`` / ``TIMM_VALIDATE_SCRIPT`` (validate.py also falls back to the
   ``validate.py`` next to ``TIMM_TRAIN_SCRIPT``);
3. a cached copy of the pinned commit, ``$XDG_CACHE_HOME/gka_vision/timm-<commit>/<name>``
   (``~/.cache`` when ``XDG_CACHE_HOME`` is unset);
4. a download of the file at the pinned pytorch-image-models commit into that cache.

Steps 3 and 4 run only files whose SHA-256 matches ``pinned.json``; user-chosen files (1, 2) are the
user's responsibility and are run as given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Optional

__all__ = [
    'SCRIPT_NAMES', 'ENV_VARS', 'Pin', 'LocatedScript', 'ScriptNotFoundError', 'ScriptIntegrityError',
    'load_pin', 'cache_dir', 'sha256_file', 'download_url', 'fetch_command', 'locate_script',
]

SCRIPT_NAMES = ('train.py', 'validate.py')
ENV_VARS = {'train.py': 'TIMM_TRAIN_SCRIPT', 'validate.py': 'TIMM_VALIDATE_SCRIPT'}

Downloader = Callable[[str, Path], None]


class ScriptNotFoundError(RuntimeError):
    """No usable train.py / validate.py; the message says how to get one."""


class ScriptIntegrityError(RuntimeError):
    """A downloaded file does not match the pinned SHA-256; it was deleted and is never run."""


@dataclass(frozen=True)
class Pin:
    """The pytorch-image-models commit whose scripts the configs were written against."""
    repo: str
    commit: str
    raw_url: str
    sha256: Mapping[str, str]

    @property
    def short(self) -> str:
        return self.commit[:12]

    def url(self, name: str) -> str:
        return self.raw_url.format(commit=self.commit, name=name)


@dataclass(frozen=True)
class LocatedScript:
    """Where a script was found: ``source`` is one of explicit / env / cache / download."""
    name: str
    path: Path
    source: str
    matches_pin: bool


def load_pin() -> Pin:
    """Read ``pinned.json`` shipped inside the package."""
    data = json.loads(resources.files(__package__).joinpath('pinned.json').read_text(encoding='utf-8'))
    return Pin(repo=data['repo'], commit=data['commit'], raw_url=data['raw_url'], sha256=dict(data['files']))


def cache_dir(pin: Optional[Pin] = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The folder that holds the verified copies of the pinned scripts."""
    pin = pin or load_pin()
    environ = os.environ if environ is None else environ
    base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'gka_vision' / f'timm-{pin.short}'


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def download_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Default downloader: plain HTTPS GET into ``dest``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    dest.write_bytes(data)


def fetch_command(name: str, pin: Optional[Pin] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """The shell line that puts the pinned ``name`` where :func:`locate_script` looks for it."""
    pin = pin or load_pin()
    target = cache_dir(pin, environ)
    return (
        f'mkdir -p {shlex.quote(str(target))} && '
        f'curl -fL -o {shlex.quote(str(target / name))} {pin.url(name)}'
    )


def _offline_message(name: str, pin: Pin, environ: Mapping[str, str], reason: str) -> str:
    env_var = ENV_VARS[name]
    target = cache_dir(pin, environ)
    return (
        f"timm's {name} was not found: no --timm-script, {env_var} is not set, no cached copy in {target}, "
        f"and downloading it failed ({reason}).\n"
        f"Get the pinned copy (pytorch-image-models @ {pin.short}) once, on a machine with network access:\n"
        f"    {fetch_command(name, pin, environ)}\n"
        f"(it is checked against SHA-256 {pin.sha256[name]} before it runs), "
        f"or point at a {name} you already have:\n"
        f"    export {env_var}=/path/to/pytorch-image-models/{name}"
    )


def _user_file(name: str, path: str, how: str, pin: Pin) -> LocatedScript:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ScriptNotFoundError(f'{how} points to {path!r}, which is not a file (expected a path to timm\'s {name})')
    p = p.resolve()
    return LocatedScript(name, p, 'explicit' if how.startswith('--') else 'env', sha256_file(p) == pin.sha256[name])


def locate_script(
        name: str = 'train.py',
        *,
        explicit: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
        pin: Optional[Pin] = None,
        downloader: Optional[Downloader] = None,
) -> LocatedScript:
    """Find ``name`` (train.py or validate.py) following the module's resolution order.

    Args:
        name: 'train.py' or 'validate.py'.
        explicit: a path given on the command line (``--timm-script``); wins over everything.
        environ: environment mapping (``os.environ`` by default).
        pin: the pinned commit (``pinned.json`` by default).
        downloader: ``f(url, dest_path)``; :func:`download_url` by default.

    Raises:
        ScriptNotFoundError: nothing usable; the message carries the command that fixes it.
        ScriptIntegrityError: the downloaded file did not match the pinned SHA-256 (it was deleted).
    """
    if name not in SCRIPT_NAMES:
        raise ValueError(f'name must be one of {SCRIPT_NAMES}, got {name!r}')
    environ = os.environ if environ is None else environ
    pin = pin or load_pin()
    downloader = downloader or download_url

    if explicit:
        return _user_file(name, explicit, '--timm-script', pin)
    env_var = ENV_VARS[name]
    if environ.get(env_var):
        return _user_file(name, environ[env_var], env_var, pin)
    if name == 'validate.py' and environ.get(ENV_VARS['train.py']):
        sibling = Path(environ[ENV_VARS['train.py']]).expanduser().parent / name
        if sibling.is_file():
            return _user_file(name, str(sibling), f'the validate.py next to {ENV_VARS["train.py"]}', pin)

    expected = pin.sha256[name]
    target_dir = cache_dir(pin, environ)
    cached = target_dir / name
    if cached.is_file():
        if sha256_file(cached) == expected:
            return LocatedScript(name, cached, 'cache', True)
        # A modified or truncated cache entry is never run; it is replaced by a verified download.
        cached.unlink()

    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        # Unique temp name + atomic rename: torchrun ranks may download at the same time.
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{name}.', suffix='.part', dir=target_dir)
        os.close(fd)
    except OSError as e:
        raise ScriptNotFoundError(_offline_message(name, pin, environ, f'cannot write to the cache: {e}')) from e
    tmp = Path(tmp_name)
    try:
        try:
            downloader(pin.url(name), tmp)
        except Exception as e:  # any network / HTTP / OS failure means "offline" to the user
            raise ScriptNotFoundError(_offline_message(name, pin, environ, f'{type(e).__name__}: {e}')) from e
        got = sha256_file(tmp)
        if got != expected:
            raise ScriptIntegrityError(
                f'refusing to run the downloaded {name}: its SHA-256 is {got}, expected {expected} '
                f'(pytorch-image-models @ {pin.commit}, {pin.url(name)}). The file was deleted.'
            )
        os.replace(tmp, cached)
    finally:
        if tmp.exists():
            tmp.unlink()
    return LocatedScript(name, cached, 'download', True)
