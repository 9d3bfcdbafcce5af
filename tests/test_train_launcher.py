"""The train_imagenet launcher without timm's train.py: where scripts come from, integrity, messages, argv.

No test touches the network: every download goes through a fake downloader (or a monkeypatched default).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.error
from pathlib import Path

import pytest

from train_imagenet import cli, locate
from train_imagenet.locate import (
    ENV_VARS, Pin, ScriptIntegrityError, ScriptNotFoundError, cache_dir, fetch_command, load_pin, locate_script,
)
from train_imagenet.runner import run_script

GOOD = b'# a stand-in for the pinned train.py\n'
GOOD_VAL = b'# a stand-in for the pinned validate.py\n'


def _pin() -> Pin:
    return Pin(
        repo='example/pytorch-image-models',
        commit='0123456789abcdef0123456789abcdef01234567',
        raw_url='https://raw.example.invalid/{commit}/{name}',
        sha256={'train.py': hashlib.sha256(GOOD).hexdigest(), 'validate.py': hashlib.sha256(GOOD_VAL).hexdigest()},
    )


class FakeDownloader:
    """Records the URLs asked for and writes the given bytes (or raises)."""

    def __init__(self, payload: dict | None = None, error: Exception | None = None):
        self.payload = payload or {'train.py': GOOD, 'validate.py': GOOD_VAL}
        self.error = error
        self.urls = []

    def __call__(self, url: str, dest: Path) -> None:
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        dest.write_bytes(self.payload[url.rsplit('/', 1)[-1]])


@pytest.fixture
def env(tmp_path):
    """A clean environment whose cache lives in tmp_path (no TIMM_* variables)."""
    return {'XDG_CACHE_HOME': str(tmp_path / 'xdg')}


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_pinned_json_is_complete():
    pin = load_pin()
    assert re.fullmatch(r'[0-9a-f]{40}', pin.commit)
    assert pin.repo == 'huggingface/pytorch-image-models'
    for name in ('train.py', 'validate.py'):
        assert re.fullmatch(r'[0-9a-f]{64}', pin.sha256[name]), name
        assert pin.url(name) == f'https://raw.githubusercontent.com/{pin.repo}/{pin.commit}/{name}'


def test_cache_dir_honours_xdg_and_home(tmp_path, monkeypatch):
    pin = _pin()
    assert cache_dir(pin, {'XDG_CACHE_HOME': str(tmp_path)}) == tmp_path / 'gka_vision' / 'timm-0123456789ab'
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert cache_dir(pin, {}) == tmp_path / 'home' / '.cache' / 'gka_vision' / 'timm-0123456789ab'


def test_resolution_order_explicit_env_cache_download(tmp_path, env):
    pin = _pin()
    dl = FakeDownloader()
    explicit = _write(tmp_path / 'mine' / 'train.py', b'# explicit\n')
    from_env = _write(tmp_path / 'env' / 'train.py', b'# env\n')
    environ = dict(env, TIMM_TRAIN_SCRIPT=from_env)

    # 4. nothing anywhere -> download into the cache (verified)
    got = locate_script('train.py', environ=env, pin=pin, downloader=dl)
    assert (got.source, got.matches_pin) == ('download', True)
    assert got.path == cache_dir(pin, env) / 'train.py' and got.path.read_bytes() == GOOD
    assert dl.urls == ['https://raw.example.invalid/0123456789abcdef0123456789abcdef01234567/train.py']
    # 3. the cached copy is used next time, without the network
    got = locate_script('train.py', environ=env, pin=pin, downloader=dl)
    assert got.source == 'cache' and len(dl.urls) == 1
    # 2. the environment beats the cache
    got = locate_script('train.py', environ=environ, pin=pin, downloader=dl)
    assert (got.source, got.path, got.matches_pin) == ('env', Path(from_env).resolve(), False)
    # 1. an explicit path beats everything
    got = locate_script('train.py', explicit=explicit, environ=environ, pin=pin, downloader=dl)
    assert (got.source, got.path) == ('explicit', Path(explicit).resolve())
    assert len(dl.urls) == 1


def test_validate_py_env_then_sibling_of_train_py(tmp_path, env):
    pin = _pin()
    dl = FakeDownloader()
    train = _write(tmp_path / 'timm' / 'train.py', b'# t\n')
    sibling = _write(tmp_path / 'timm' / 'validate.py', GOOD_VAL)
    own = _write(tmp_path / 'other' / 'validate.py', b'# v\n')
    got = locate_script('validate.py', environ=dict(env, TIMM_TRAIN_SCRIPT=train), pin=pin, downloader=dl)
    assert (got.source, got.path, got.matches_pin) == ('env', Path(sibling).resolve(), True)
    got = locate_script('validate.py', environ=dict(env, TIMM_TRAIN_SCRIPT=train, TIMM_VALIDATE_SCRIPT=own),
                        pin=pin, downloader=dl)
    assert got.path == Path(own).resolve()
    # TIMM_TRAIN_SCRIPT without a validate.py beside it: fall through to the cache / download
    lone = _write(tmp_path / 'lone' / 'train.py', b'# t\n')
    got = locate_script('validate.py', environ=dict(env, TIMM_TRAIN_SCRIPT=lone), pin=pin, downloader=dl)
    assert got.source == 'download' and dl.urls[-1].endswith('/validate.py')


def test_missing_user_paths_are_named(tmp_path, env):
    pin = _pin()
    with pytest.raises(ScriptNotFoundError, match='--timm-script'):
        locate_script('train.py', explicit=str(tmp_path / 'nope.py'), environ=env, pin=pin, downloader=FakeDownloader())
    with pytest.raises(ScriptNotFoundError, match='TIMM_TRAIN_SCRIPT'):
        locate_script('train.py', environ=dict(env, TIMM_TRAIN_SCRIPT=str(tmp_path / 'nope.py')), pin=pin,
                      downloader=FakeDownloader())
    with pytest.raises(ValueError, match='name must be one of'):
        locate_script('inference.py', environ=env, pin=pin)


def test_download_with_wrong_sha256_is_refused_and_deleted(env):
    pin = _pin()
    dl = FakeDownloader(payload={'train.py': b'print("tampered")\n'})
    with pytest.raises(ScriptIntegrityError) as info:
        locate_script('train.py', environ=env, pin=pin, downloader=dl)
    msg = str(info.value)
    assert hashlib.sha256(b'print("tampered")\n').hexdigest() in msg and pin.sha256['train.py'] in msg
    folder = cache_dir(pin, env)
    assert not (folder / 'train.py').exists()
    assert list(folder.iterdir()) == []  # no partial download left behind


def test_tampered_cache_is_never_used(env):
    pin = _pin()
    cached = cache_dir(pin, env) / 'train.py'
    _write(cached, b'print("edited by hand")\n')
    dl = FakeDownloader()
    got = locate_script('train.py', environ=env, pin=pin, downloader=dl)
    assert got.source == 'download' and cached.read_bytes() == GOOD and len(dl.urls) == 1
    # the same with no network: the bad file is removed and the user is told how to get a good one
    _write(cached, b'print("edited again")\n')
    with pytest.raises(ScriptNotFoundError):
        locate_script('train.py', environ=env, pin=pin, downloader=FakeDownloader(error=OSError('offline')))
    assert not cached.exists()


def test_offline_message_has_the_exact_fix(env):
    pin = _pin()
    dl = FakeDownloader(error=urllib.error.URLError('Name or service not known'))
    with pytest.raises(ScriptNotFoundError) as info:
        locate_script('train.py', environ=env, pin=pin, downloader=dl)
    msg = str(info.value)
    folder = cache_dir(pin, env)
    expected_cmd = f'mkdir -p {folder} && curl -fL -o {folder / "train.py"} {pin.url("train.py")}'
    assert fetch_command('train.py', pin, env) == expected_cmd
    assert expected_cmd in msg
    assert 'export TIMM_TRAIN_SCRIPT=' in msg and 'Name or service not known' in msg
    assert pin.sha256['train.py'] in msg


def test_cli_offline_prints_one_message_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('TIMM_TRAIN_SCRIPT', raising=False)
    monkeypatch.delenv('TIMM_VALIDATE_SCRIPT', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))

    def no_network(url, dest):
        raise urllib.error.URLError('offline in this test')

    monkeypatch.setattr(locate, 'download_url', no_network)
    for argv, name in ((['--model', 'gka_tiny'], 'train.py'), (['validate', '--model', 'gka_tiny'], 'validate.py')):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == ''
        assert err.count('train_imagenet:') == 1 and 'Traceback' not in err
        assert fetch_command(name) in err and ENV_VARS[name] in err


_RECORDER = '''
import json, os, sys
record = {
    "argv": sys.argv,
    "name": __name__,
    "gka_vision_loaded": "gka_vision" in sys.modules,
    "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
}
with open(os.environ["RECORD_TO"], "w") as f:
    json.dump(record, f)
if os.environ.get("EXIT_WITH"):
    raise SystemExit(int(os.environ["EXIT_WITH"]))
'''


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    script = tmp_path / 'fake_timm' / 'train.py'
    _write(script, _RECORDER.encode())
    _write(script.with_name('validate.py'), _RECORDER.encode())
    out = tmp_path / 'record.json'
    monkeypatch.setenv('RECORD_TO', str(out))
    return script, out


def test_arguments_reach_the_script_in_order_and_argv_is_restored(recorder, capsys):
    script, out = recorder
    before = sys.argv
    snapshot = list(sys.argv)
    passed = ['--config', 'configs/gka_small_in1k.yaml', '--data-dir', '/data/imagenet', '--lr=0.1', '-b', '64',
              '--model-kwargs', 'num_iter=5', 'scan=cross']
    assert cli.main(['--timm-script', str(script), *passed]) == 0
    rec = json.loads(out.read_text())
    assert rec['argv'] == [str(script.resolve()), *passed]
    assert rec['name'] == '__main__' and rec['gka_vision_loaded'] is True
    assert sys.argv is before and sys.argv == snapshot
    assert 'differs from the pinned' in capsys.readouterr().err


def test_validate_mode_runs_validate_py(recorder, monkeypatch):
    script, out = recorder
    monkeypatch.setenv('TIMM_TRAIN_SCRIPT', str(script))
    monkeypatch.delenv('TIMM_VALIDATE_SCRIPT', raising=False)
    assert cli.main(['validate', '--checkpoint', 'x.pth.tar', '--img-size', '288']) == 0
    rec = json.loads(out.read_text())
    assert rec['argv'] == [str(script.with_name('validate.py').resolve()), '--checkpoint', 'x.pth.tar',
                           '--img-size', '288']


def test_exit_from_the_script_propagates_and_restores_argv(recorder, monkeypatch):
    script, _ = recorder
    monkeypatch.setenv('EXIT_WITH', '3')
    before = sys.argv
    with pytest.raises(SystemExit) as info:
        run_script(script, ['--help'])
    assert info.value.code == 3 and sys.argv is before


def test_torchrun_environment_reaches_the_script_untouched(recorder, monkeypatch, capsys):
    script, out = recorder
    for k, v in (('RANK', '1'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '1')):
        monkeypatch.setenv(k, v)
    assert cli.main(['--timm-script', str(script), '--model', 'gka_tiny']) == 0
    assert json.loads(out.read_text())['env'] == {'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}
    assert capsys.readouterr().err == ''  # only rank 0 speaks
    assert all(os.environ[k] == v for k, v in (('RANK', '1'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '1')))


def test_split_launcher_args():
    mode, opts, rest = cli.split_launcher_args(
        ['--model', 'gka_tiny', '--timm-script=/x/train.py', '--epochs', '3', '--demo', '--demo-dir', '/d', '-b', '8'])
    assert mode == 'train' and rest == ['--model', 'gka_tiny', '--epochs', '3', '-b', '8']
    assert opts == dict(timm_script='/x/train.py', demo=True, demo_dir='/d', help=False)
    mode, opts, rest = cli.split_launcher_args(['validate', '--timm-script', '/x/validate.py', '--help'])
    assert (mode, opts['timm_script'], opts['help'], rest) == ('validate', '/x/validate.py', True, ['--help'])
    # train.py options that merely start like ours are not taken
    assert cli.split_launcher_args(['--demo-x', '1'])[2] == ['--demo-x', '1']
    with pytest.raises(SystemExit, match='--timm-script expects a path'):
        cli.split_launcher_args(['--timm-script'])
    with pytest.raises(SystemExit, match='cannot be combined with validate'):
        cli.split_launcher_args(['validate', '--demo'])
    with pytest.raises(SystemExit, match='only applies with --demo'):
        cli.split_launcher_args(['--demo-dir', '/d'])


@pytest.mark.parametrize('preset', [None, 'ACTIVE'])
def test_demo_dispatch_and_passive_openmp_default(monkeypatch, preset):
    from train_imagenet import demo
    seen = {}

    def fake_run_demo(rest, demo_dir=None, timm_script=None):
        seen.update(rest=rest, demo_dir=demo_dir, timm_script=timm_script, omp=os.environ.get('OMP_WAIT_POLICY'))
        return 0

    monkeypatch.setenv('OMP_WAIT_POLICY', 'ACTIVE')  # makes monkeypatch restore the original state
    if preset is None:
        monkeypatch.delenv('OMP_WAIT_POLICY')
    else:
        monkeypatch.setenv('OMP_WAIT_POLICY', preset)
    monkeypatch.setattr(demo, 'run_demo', fake_run_demo)
    assert cli.main(['--demo', '--epochs', '2', '--demo-dir', '/somewhere', '--timm-script', '/x/train.py']) == 0
    assert seen == dict(rest=['--epochs', '2'], demo_dir='/somewhere', timm_script='/x/train.py',
                        omp=preset or 'PASSIVE')  # the caller's own setting is kept
