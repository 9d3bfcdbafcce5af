"""configs/*.yaml: every key is a real train.py option, and the ImageNet recipes say what the issue asks for."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
import yaml

import gka_vision  # noqa: F401  (registers the gka_* models)
from train_imagenet.argkeys import read_keys_file
from train_imagenet.locate import load_pin, sha256_file

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
KEYS_FILE = CONFIGS / 'train_py_keys.txt'
IN1K = {size: CONFIGS / f'gka_{size}_in1k.yaml' for size in ('tiny', 'small', 'base')}
DIGITS = CONFIGS / 'gka_tiny_digits.yaml'


def _load(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    assert isinstance(cfg, dict), f'{path.name} must be a mapping of train.py keys'
    return cfg


def unknown_keys(cfg: dict, keys: set) -> list:
    return sorted(k for k in cfg if k not in keys)


def test_keys_file_names_the_pinned_commit():
    text = KEYS_FILE.read_text()
    pin = load_pin()
    assert f'{pin.repo}@{pin.commit}' in text
    assert pin.sha256['train.py'] in text
    keys = read_keys_file(KEYS_FILE)
    # a few options every train.py of this generation has, and none of the comment lines
    assert {'model', 'lr_base', 'model_ema', 'amp_dtype', 'device_modules', 'model_kwargs', 'resume'} <= keys
    assert not any(k.startswith('#') or ' ' in k for k in keys)


def test_key_check_catches_a_misspelt_key():
    keys = read_keys_file(KEYS_FILE)
    assert unknown_keys({'model': 'gka_tiny', 'weight_decay': 0.05}, keys) == []
    assert unknown_keys({'model': 'gka_tiny', 'weight-decay': 0.05, 'mixup_alpha': 0.8}, keys) == [
        'mixup_alpha', 'weight-decay']


@pytest.mark.parametrize('path', sorted(CONFIGS.glob('*.yaml')), ids=lambda p: p.name)
def test_every_yaml_key_is_a_train_py_option(path):
    assert unknown_keys(_load(path), read_keys_file(KEYS_FILE)) == []


def test_all_expected_configs_exist():
    assert sorted(p.name for p in CONFIGS.glob('*.yaml')) == sorted(
        [p.name for p in IN1K.values()] + [DIGITS.name])


@pytest.mark.parametrize('size', sorted(IN1K))
def test_in1k_recipe_is_deit_style(size):
    cfg = _load(IN1K[size])
    assert cfg['model'] == f'gka_{size}' and timm.is_model(cfg['model'])
    assert cfg['device_modules'] == ['gka_vision']
    assert cfg['num_classes'] == 1000 and cfg['epochs'] == 300 and cfg.get('cooldown_epochs', 0) == 0
    assert cfg['opt'] == 'adamw' and cfg['weight_decay'] == 0.05
    # the LR follows the global batch: lr_base given, lr left to train.py
    assert 'lr' not in cfg and cfg['lr_base'] > 0 and cfg['lr_base_size'] > 0 and cfg['lr_base_scale'] == 'linear'
    assert cfg['sched'] == 'cosine' and cfg['warmup_epochs'] > 0
    assert cfg['smoothing'] == 0.1 and cfg['mixup'] > 0 and cfg['cutmix'] > 0
    assert cfg['aa'].startswith('rand-') and cfg['reprob'] > 0
    assert cfg['model_ema'] is True and 0.999 < cfg['model_ema_decay'] < 1
    assert cfg['amp'] is True and cfg['amp_dtype'] == 'bfloat16'
    assert cfg['clip_grad'] > 0 and cfg['clip_mode'] == 'norm'
    assert cfg['img_size'] == 224


def test_drop_path_grows_with_size():
    rates = [_load(IN1K[s])['drop_path'] for s in ('tiny', 'small', 'base')]
    assert 0 < rates[0] < rates[1] < rates[2] < 0.5


def test_digits_config_builds_a_small_gka_tiny():
    cfg = _load(DIGITS)
    assert cfg['model'] == 'gka_tiny' and cfg['num_classes'] == 10
    kw = cfg['model_kwargs']
    assert kw['img_size'] == cfg['img_size'] == 32
    assert cfg['amp'] is True and cfg['amp_dtype'] == 'bfloat16'
    model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], drop_path_rate=cfg['drop_path'], **kw)
    assert model.patch_embed.grid_size == (32 // kw['patch_size'],) * 2
    assert len(model.blocks) == kw['depth']
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.skipif(not os.environ.get('TIMM_TRAIN_SCRIPT'),
                    reason='needs timm\'s train.py: set TIMM_TRAIN_SCRIPT to the pinned train.py to check the key list')
def test_keys_file_matches_the_pinned_train_py():
    from train_imagenet.argkeys import train_py_dests
    script = Path(os.environ['TIMM_TRAIN_SCRIPT'])
    if sha256_file(script) != load_pin().sha256['train.py']:
        pytest.skip(f'{script} is not the pinned train.py (SHA-256 differs); the key list is for the pinned one')
    assert set(train_py_dests(script)) == read_keys_file(KEYS_FILE)
