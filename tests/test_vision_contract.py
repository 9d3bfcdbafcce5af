"""The timm model contract (timm_contract.md §1) for every registered gka_* model.

These checks read structure, shapes, devices and dtypes, so they build full-size models on the 'meta' device (no
memory, no arithmetic), the way timm's own cfg tests do; numerical checks live in test_vision_models.py.
"""
from __future__ import annotations

import fnmatch
import inspect

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._manipulate import group_parameters

import gka_vision  # noqa: F401  (registers the models)
from gka_vision.models import GKANet

MODEL_NAMES = [f'gka_{size}{scan}' for size in ('tiny', 'small', 'base') for scan in ('', '_cross', '_alt')]
WIDTHS = {'tiny': 192, 'small': 384, 'base': 768}


def _meta(name, **kwargs):
    return timm.create_model(name, pretrained=False, device='meta', dtype=torch.float32, **kwargs).eval()


def test_registered_names():
    assert sorted(timm.list_models('gka*')) == sorted(MODEL_NAMES)
    assert set(timm.list_models(module='gka')) == set(MODEL_NAMES)
    assert 'gka' in timm.list_modules()


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_default_cfg(name):
    m = _meta(name)
    cfg = m.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['pool_size'] == (14, 14)
    assert tuple(cfg['mean']) == IMAGENET_DEFAULT_MEAN and tuple(cfg['std']) == IMAGENET_DEFAULT_STD
    assert 0 < cfg['crop_pct'] <= 1
    assert cfg['license'] and cfg['num_classes'] == 1000
    assert not cfg.get('hf_hub_id')  # no 'timm/' hub id: we publish no weights there
    assert cfg['architecture'] == name
    sd = m.state_dict()
    assert cfg['first_conv'] + '.weight' in sd
    assert cfg['classifier'] + '.weight' in sd
    assert m.in_chans == cfg['input_size'][0]
    size = name.split('_')[1]
    scan = name.split('_')[2] if name.count('_') == 2 else 'bi'
    assert m.scan == scan
    assert m.num_features == m.head_hidden_size == WIDTHS[size]
    assert len(m.blocks) == 12
    assert m.blocks[0].mixer.head_dim == 64 and m.blocks[0].mixer.num_heads == WIDTHS[size] // 64
    assert m.blocks[0].mlp.fc1.out_features == 4 * WIDTHS[size]
    assert list(m.blocks[0]._modules) == ['norm1', 'mixer', 'drop_path1', 'norm2', 'mlp', 'drop_path2']
    assert m.blocks[0].mixer.num_dir == {'bi': 2, 'cross': 4, 'alt': 1}[scan]
    assert [i['reduction'] for i in m.feature_info] == [16] * 12
    assert [i['module'] for i in m.feature_info] == [f'blocks.{i}' for i in range(12)]


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_api_contract(name):
    m = _meta(name)
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_a_model_arg=1)
    assert inspect.signature(m.reset_classifier).parameters['global_pool'].default is None
    groups = group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    names = [n for n, _ in m.named_parameters()]
    for pattern in m.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    assert any(fnmatch.fnmatch('blocks.3.mixer.A_log', p) for p in m.no_weight_decay())
    assert m.get_classifier() is m.head
    assert m.output_fmt == 'NHWC'


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_shapes_and_head_resets(name):
    m = _meta(name)
    x = torch.randn(1, 3, 224, 224, device='meta')
    feats = m.forward_features(x)
    assert feats.shape == (1, 14, 14, m.num_features)  # NHWC, spatial == pool_size
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, m.head_hidden_size)
    assert m(x).shape == (1, 1000)
    m.reset_classifier(0)
    assert m.num_classes == 0 and m(x).shape == pre.shape
    m.reset_classifier(0, '')
    assert m(x).shape == (1, 14, 14, m.num_features)
    m.reset_classifier(5, 'max')
    assert m(x).shape == (1, 5)
    with pytest.raises(ValueError, match='global_pool'):
        m.reset_classifier(5, 'token')
    assert _meta(name, num_classes=0)(x).shape == pre.shape
    assert _meta(name, num_classes=0, global_pool='')(x).shape == (1, 14, 14, m.num_features)
    assert _meta(name, in_chans=1).patch_embed.proj.weight.shape[1] == 1


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_meta_device_dtype_and_freezing(name):
    m = _meta(name)
    misplaced = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type != 'meta']
    assert not misplaced
    # dtype round trip: after a forward, .to(bf16) must give bf16 outputs (no stale fp32 caches)
    x = torch.randn(1, 3, 64, 64, device='meta')
    m(x)
    m.to(torch.bfloat16)
    assert m(x.bfloat16()).dtype == torch.bfloat16
    m.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    # reset_classifier keeps the model's device / dtype / train mode
    m.to(device='meta', dtype=torch.float64)
    m.reset_classifier(0)
    m.reset_classifier(2)
    assert all(p.dtype == torch.float64 and p.device.type == 'meta' for p in m.head.parameters())
    assert all(mod.training == m.training for mod in m.modules())
    # frozen parameters stay frozen through head / pooling resets and an input resize
    f = _meta(name)
    f.requires_grad_(False)
    f.reset_classifier(0)
    f.reset_classifier(0, '')
    f.set_input_size(img_size=448)
    assert f.pos_embed.shape[1:3] == (28, 28)
    assert not [n for n, p in f.named_parameters() if p.requires_grad]


def test_dtype_and_device_kwargs_reach_every_parameter():
    m = timm.create_model('gka_tiny_cross', depth=2, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert isinstance(m, GKANet)


def test_torchscript_is_refused_clearly():
    m = _meta('gka_tiny')
    with pytest.raises(RuntimeError, match='does not support TorchScript'):
        torch.jit.script(m)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match='scan must be one of'):
        timm.create_model('gka_tiny', scan='zigzag', device='meta')
    with pytest.raises(ValueError, match='global_pool must be one of'):
        timm.create_model('gka_tiny', global_pool='token', device='meta')
    with pytest.raises(ValueError, match='num_iter'):
        timm.create_model('gka_tiny', num_iter=-1, device='meta')
    with pytest.raises(ValueError, match='ridge_ratio'):
        timm.create_model('gka_tiny', ridge_ratio=0., device='meta')
    with pytest.raises(ValueError, match='pos_embed'):
        timm.create_model('gka_tiny', pos_embed='sincos', device='meta')


def test_regularisation_and_optional_parts():
    m = timm.create_model('gka_small', drop_rate=0.3, drop_path_rate=0.1, proj_drop_rate=0.05, device='meta')
    rates = [blk.drop_path2.drop_prob if hasattr(blk.drop_path2, 'drop_prob') else 0. for blk in m.blocks]
    assert rates[0] == 0. and abs(rates[-1] - 0.1) < 1e-6 and rates == sorted(rates)  # linear in depth
    assert m.head_drop.p == 0.3 and m.blocks[0].mixer.proj_drop.p == 0.05
    plain = timm.create_model('gka_tiny', pos_embed='none', device='meta')
    assert plain.pos_embed is None
    assert not any(n == 'pos_embed' for n, _ in plain.named_parameters())
    assert plain.forward_features(torch.randn(1, 3, 96, 160, device='meta')).shape == (1, 6, 10, 192)


def test_layer_decay_and_weight_decay_groups():
    from timm.optim import create_optimizer_v2
    m = timm.create_model('gka_tiny', depth=3, embed_dim=64, num_heads=1, head_dim=32)
    opt = create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == 5  # stem, 3 blocks, final norm / head
    no_wd = {id(p) for g in opt.param_groups if g['weight_decay'] == 0. for p in g['params']}
    assert id(m.pos_embed) in no_wd and id(m.blocks[1].mixer.A_log) in no_wd and id(m.blocks[1].mixer.dt_bias) in no_wd
    assert id(m.blocks[1].mixer.qkv.weight) not in no_wd
