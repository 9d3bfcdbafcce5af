"""The demo's digits ImageFolder (on small subsets) and the demo's argument / summary helpers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('sklearn', reason='the digits demo set comes from scikit-learn (pip install gka-vision[demo])')

from train_imagenet.demo import demo_config_path, demo_train_args, read_summary  # noqa: E402
from train_imagenet.demo_data import CLASS_NAMES, build_digits_imagefolder  # noqa: E402


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob('*.png'))


def test_layout_counts_and_images(tmp_path):
    info = build_digits_imagefolder(tmp_path / 'd', img_size=24, limit_per_class=5, val_fraction=0.2)
    root = Path(info.root)
    assert (info.num_train, info.num_val) == (40, 10)
    for split, per_class in (('train', 4), ('validation', 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(CLASS_NAMES)
        for c in CLASS_NAMES:
            assert len(list((root / split / c).glob('*.png'))) == per_class
    img = Image.open(next((root / 'train' / '3').glob('*.png')))
    assert img.mode == 'RGB' and img.size == (24, 24)
    px = np.asarray(img)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # grey digits as RGB
    assert len(np.unique(px)) > 2  # real content, not a blank image
    # train and validation hold different digits (file names are the source indices)
    train_ids = {p.name for p in (root / 'train').rglob('*.png')}
    val_ids = {p.name for p in (root / 'validation').rglob('*.png')}
    assert not train_ids & val_ids
    assert json.loads((root / 'manifest.json').read_text())['num_train'] == 40


def test_build_is_deterministic_and_made_once(tmp_path):
    a = build_digits_imagefolder(tmp_path / 'a', limit_per_class=3, seed=7)
    b = build_digits_imagefolder(tmp_path / 'b', limit_per_class=3, seed=7)
    ra, rb = Path(a.root), Path(b.root)
    assert _files(ra) == _files(rb) and len(_files(ra)) == 30
    assert all((ra / f).read_bytes() == (rb / f).read_bytes() for f in _files(ra))
    stamp = (ra / 'manifest.json').stat().st_mtime_ns
    again = build_digits_imagefolder(tmp_path / 'a', limit_per_class=3, seed=7)
    assert again == a and (ra / 'manifest.json').stat().st_mtime_ns == stamp
    other = build_digits_imagefolder(tmp_path / 'c', limit_per_class=3, seed=8)
    assert _files(Path(other.root)) != _files(ra)  # the seed picks the split
    with pytest.raises(FileExistsError, match='other settings'):
        build_digits_imagefolder(tmp_path / 'a', limit_per_class=3, seed=8)
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'x.txt').write_text('x')
    with pytest.raises(FileExistsError, match='no manifest.json'):
        build_digits_imagefolder(tmp_path / 'junk', limit_per_class=3)


def test_timm_reads_it_as_an_imagefolder(tmp_path):
    from timm.data import create_dataset
    info = build_digits_imagefolder(tmp_path / 'd', limit_per_class=3)
    train = create_dataset('', root=info.root, split='train')
    val = create_dataset('', root=info.root, split='validation')
    assert (len(train), len(val)) == (info.num_train, info.num_val)
    img, target = val[0]
    assert img.size == (32, 32) and 0 <= target < 10
    assert sorted({t for _, t in (train[i] for i in range(len(train)))}) == list(range(10))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match='img_size'):
        build_digits_imagefolder(tmp_path / 'x', img_size=4)
    with pytest.raises(ValueError, match='val_fraction'):
        build_digits_imagefolder(tmp_path / 'x', val_fraction=1.0)
    with pytest.raises(ValueError, match='limit_per_class'):
        build_digits_imagefolder(tmp_path / 'x', limit_per_class=1)


def test_demo_args_put_the_caller_last(tmp_path):
    args = demo_train_args(tmp_path / 'data', tmp_path / 'runs' / 'exp', ['--epochs', '2', '--device', 'cuda'],
                           device='cpu')
    assert args[:2] == ['--config', str(demo_config_path())]
    assert args[-4:] == ['--epochs', '2', '--device', 'cuda']  # argparse keeps the last value: the caller wins
    assert args[args.index('--output') + 1] == str(tmp_path / 'runs')
    assert args[args.index('--experiment') + 1] == 'exp'
    assert demo_train_args(tmp_path, tmp_path / 'r', ['--config', 'mine.yaml'], device='cpu')[0] == '--data-dir'


def test_read_summary_handles_resume_headers_and_nan(tmp_path):
    s = tmp_path / 'summary.csv'
    s.write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
        '0,2.2,2.1,40.0,80.0,0.001\n'
        '1,1.2,1.0,85.5,99.0,0.001\n'
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'  # train.py repeats the header on resume
        '2,0.6,0.5,93.25,100.0,0.0005\n'
        '3,0.4,0.45,92.0,100.0,0.0001\n')
    res = read_summary(s)
    assert (res.epochs, res.last_top1, res.best_top1, res.best_epoch, res.finite) == (4, 92.0, 93.25, 2, True)
    s.write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,nan,nan,10.0,50.0,0.001\n')
    res = read_summary(s)
    assert not res.finite and math.isclose(res.last_top1, 10.0)
