"""The distribution: one wheel holding gka_vision, gka_kernels (from kernels/) and train_imagenet, complete."""
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared_packages():
    cfg = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
    return cfg['packages'], cfg['package-dir']


def _source_packages():
    """Import names of every folder with an __init__.py under the three top-level package folders."""
    found = set()
    folders = (('kernels', 'gka_kernels'), ('gka_vision', 'gka_vision'), ('train_imagenet', 'train_imagenet'))
    for folder, name in folders:
        for init in (ROOT / folder).rglob('__init__.py'):
            rel = init.parent.relative_to(ROOT / folder)
            found.add('.'.join((name, *rel.parts)))
    return found


def test_every_package_folder_is_declared():
    packages, package_dir = _declared_packages()
    assert package_dir == {'gka_kernels': 'kernels'}
    missing = _source_packages() - set(packages)
    assert not missing, f'add these to [tool.setuptools].packages in pyproject.toml: {sorted(missing)}'


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp('src')
    for item in ('pyproject.toml', 'README.md', 'kernels', 'gka_vision', 'train_imagenet', 'configs'):
        p = ROOT / item
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, src / item)
    out = tmp_path_factory.mktemp('wheel')
    # No build isolation: the build needs only setuptools, already installed, and no network.
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out),
                    str(src)], check=True)
    (whl,) = out.glob('gka_vision-*.whl')
    return whl


def test_wheel_holds_all_three_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith(('.dist-info', '.data'))}
    assert tops == {'gka_vision', 'gka_kernels', 'train_imagenet'}
    for pkg in _source_packages():
        assert '/'.join(pkg.split('.')) + '/__init__.py' in names, pkg
    assert 'gka_kernels/api.py' in names and 'gka_kernels/torch_chunk/function.py' in names
    assert not any(n.startswith('kernels/') for n in names)
    # package data that the code loads at run time
    for data in (ROOT / 'train_imagenet').glob('*.json'):
        assert f'train_imagenet/{data.name}' in names
    # the train.py configs, so the demo runs from a plain install too (train_imagenet.demo looks there)
    for cfg in (ROOT / 'configs').glob('*.yaml'):
        assert any(n.endswith(f'.data/data/share/gka-vision/configs/{cfg.name}') for n in names), cfg.name


def test_wheel_metadata_declares_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    reqs = [line.split(':', 1)[1].strip() for line in meta.splitlines() if line.startswith('Requires-Dist:')]
    for dep in ('torch>=', 'torchvision>=', 'timm>=', 'einops>=', 'safetensors>='):
        assert any(r.startswith(dep) for r in reqs), dep
    assert any(r.startswith('triton') and 'Linux' in r for r in reqs)
    assert any(r.startswith('pytest') and 'extra == "dev"' in r for r in reqs)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / 'README.md').read_text()
    ci = (ROOT / '.ci' / 'run').read_text()
    test_cmd = next(line.strip() for line in readme.splitlines() if line.strip().startswith('python -m pytest'))
    assert test_cmd in ci
