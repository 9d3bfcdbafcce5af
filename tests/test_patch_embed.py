"""The patch embedding as a GEMM (gka_vision/models/patch_embed.py) against the convolution it replaces."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

import gka_vision  # noqa: F401  (registers the models)
from gka_inputs import rel_rmse
from gka_vision.models.patch_embed import GemmPatchEmbed, PatchConv2d


@pytest.fixture(autouse=True)
def gemm_on_cpu(monkeypatch):
    """The GEMM is the default on CUDA only; these CPU tests switch it on."""
    monkeypatch.setenv('GKA_PATCH_GEMM', '1')


def _pair(conv_kwargs):
    """A Conv2d and a PatchConv2d sharing one set of float64 weights."""
    conv = nn.Conv2d(**conv_kwargs, dtype=torch.float64)
    gemm = PatchConv2d(**conv_kwargs, dtype=torch.float64)
    gemm.load_state_dict(conv.state_dict())
    return conv, gemm


@pytest.mark.parametrize('in_ch,patch,size,bias', [
    (3, 16, (64, 48), True),
    (3, 16, (70, 37), True),      # ragged: the strided conv drops the last partial patch
    (1, (4, 8), (16, 24), False),  # non-square patch, one channel, no bias
    (5, 7, (21, 14), True),
])
def test_patch_gemm_matches_conv_forward_and_backward(in_ch, patch, size, bias):
    conv, gemm = _pair(dict(in_channels=in_ch, out_channels=12, kernel_size=patch, stride=patch, bias=bias))
    x = torch.randn(2, in_ch, *size, dtype=torch.float64, requires_grad=True)
    y_ref = conv(x)
    y = gemm(x)
    assert y.shape == y_ref.shape
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x] + list(conv.parameters()), dy)
    g = torch.autograd.grad(y, [x] + list(gemm.parameters()), dy)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_patch_gemm_output_is_channels_last():
    """The NHWC step after the projection (timm's nchw_to) is then a view: no copy of the token grid."""
    _, gemm = _pair(dict(in_channels=3, out_channels=8, kernel_size=4, stride=4))
    y = gemm(torch.randn(2, 3, 16, 12, dtype=torch.float64))
    assert y.permute(0, 2, 3, 1).is_contiguous()


@pytest.mark.parametrize('conv_kwargs', [
    dict(kernel_size=3, stride=3, padding=1),
    dict(kernel_size=4, stride=2),
    dict(kernel_size=4, stride=4, dilation=2),
    dict(kernel_size=2, stride=2, groups=3),
    dict(kernel_size=2, stride=2, padding='valid'),
])
def test_other_convolutions_run_as_convolutions(conv_kwargs):
    conv, gemm = _pair(dict(in_channels=3, out_channels=6, **conv_kwargs))
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    assert torch.equal(gemm(x), conv(x))


@pytest.mark.parametrize('switch,gemm_runs', [('0', False), (None, False), ('1', True)])
def test_patch_gemm_switch(monkeypatch, spy, switch, gemm_runs):
    """GKA_PATCH_GEMM=0 runs the convolution (the benchmarks' A/B switch), and so does a CPU tensor by default."""
    _, gemm = _pair(dict(in_channels=3, out_channels=8, kernel_size=4, stride=4))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    if switch is None:
        monkeypatch.delenv('GKA_PATCH_GEMM')
    else:
        monkeypatch.setenv('GKA_PATCH_GEMM', switch)
    calls = spy(torch.nn.functional, 'linear')
    assert torch.allclose(gemm(x), nn.Conv2d.forward(gemm, x), rtol=1e-12, atol=1e-12)
    assert bool(calls) == gemm_runs


def test_patch_gemm_rejects_wrong_channel_count():
    _, gemm = _pair(dict(in_channels=3, out_channels=8, kernel_size=4, stride=4))
    with pytest.raises(ValueError, match='3 input channels'):
        gemm(torch.randn(1, 4, 8, 8, dtype=torch.float64))


def test_patch_gemm_under_bf16_autocast():
    """Under autocast the patches are cast before they are gathered; the output dtype is what the conv gives."""
    conv, gemm = _pair(dict(in_channels=3, out_channels=16, kernel_size=8, stride=8))
    conv, gemm = conv.float(), gemm.float()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_ref = gemm(x), conv(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel_rmse(y, conv(x).detach()) < 4e-3


def test_gemm_patch_embed_is_timm_patch_embed():
    """Same state dict keys and outputs as timm's PatchEmbed; the GEMM survives a patch-size change."""
    kw = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=16, output_fmt='NHWC')
    ref = PatchEmbed(**kw).double()
    ours = GemmPatchEmbed(**kw).double()
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    weight = ours.proj.weight
    ours.set_input_size(patch_size=4)
    assert isinstance(ours.proj, PatchConv2d) and ours.proj.weight.shape[-2:] == (4, 4)
    assert ours(x).shape == (2, 8, 8, 16)
    ours.set_input_size(img_size=64)
    assert isinstance(ours.proj, PatchConv2d) and ours.proj.weight.shape == (16, 3, 4, 4)
    assert weight.shape == (16, 3, 8, 8)


def test_models_embed_patches_with_the_gemm():
    model = timm.create_model('gka_tiny', depth=1, num_iter=2, img_size=32)
    assert isinstance(model.patch_embed.proj, PatchConv2d)
    params = dict(model.named_parameters())
    assert params['patch_embed.proj.weight'] is model.patch_embed.proj.weight


def test_patch_gemm_leaves_float64_alone_under_autocast():
    """Autocast does not cast float64 tensors; neither does the GEMM path (so it runs in float64 like the conv)."""
    conv, gemm = _pair(dict(in_channels=3, out_channels=8, kernel_size=4, stride=4))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_ref = gemm(x), conv(x)
    assert y.dtype == y_ref.dtype == torch.float64
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
