"""Numerical behaviour of the gka_* models and the GKAMixer on CPU, at small sizes.

Structure-only contract checks on full-size models are in test_vision_contract.py. Here, checks that do not depend
on width or depth use fewer blocks (depth 2, or 4 for 'alt' so every direction of its cycle appears).
"""
from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import get_notrace_functions, get_notrace_modules, load_checkpoint

import gka_vision  # noqa: F401  (registers the models)
from gka_inputs import rel_rmse
from gka_kernels import gka_chunk
from gka_vision.layers import BETA_EPS, forget_gate_log_decay, l2_normalize
from gka_vision.models import DIRECTIONS, GKAMixer, checkpoint_filter_fn, direction_order
from gka_vision.models import mixer as mixer_module

MODEL_NAMES = [f'gka_{size}{scan}' for size in ('tiny', 'small', 'base') for scan in ('', '_cross', '_alt')]
TINY_NAMES = ['gka_tiny', 'gka_tiny_cross', 'gka_tiny_alt']


def _small(name, **kwargs):
    """A shallow copy of a registered architecture (same width / heads / scan; fewer blocks and solver steps, which
    only change the cost of these checks)."""
    kwargs.setdefault('depth', 4 if name.endswith('_alt') else 2)
    kwargs.setdefault('num_iter', 6)
    return timm.create_model(name, pretrained=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# timm test_models.py checks, in our words
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_and_grad_checkpointing(name):
    m = _small(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 1000)
        assert torch.isfinite(y).all()
        m.set_grad_checkpointing()
        y2 = m(x)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', TINY_NAMES)
def test_grad_checkpointing_gives_the_same_gradients(name):
    """Training with set_grad_checkpointing (timm's non-reentrant checkpoint, which lets each saved tensor be
    unpacked once) recomputes the blocks in the backward and must give the same gradients."""
    torch.manual_seed(0)
    m = _small(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m.zero_grad(set_to_none=True)
        m.set_grad_checkpointing(ckpt)
        m(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_conv_weight_gradient_layout_matches_the_weight():
    """DDP buckets gradients with the parameters' strides: the depthwise conv (run on channels-last activations) must
    produce a weight gradient laid out like its weight, or every DDP step copies it and warns."""
    m = _small('gka_tiny').train()
    m(torch.randn(2, 3, 32, 32)).mean().backward()
    for blk in m.blocks:
        w = blk.mixer.conv.weight
        assert w.grad.stride() == w.stride(), (w.grad.stride(), w.stride())
    sd = m.state_dict()
    assert all(t.is_contiguous() for t in sd.values())   # safetensors / torch.save see ordinary tensors


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_backward_reaches_every_parameter(name):
    m = _small(name, num_classes=42).train()
    y = m(torch.randn(2, 3, 32, 48))
    assert y.shape == (2, 42)
    y.mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing
    bad = [n for n, p in m.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    # every gate of every direction must learn: a zero gradient would mean a direction's gates are not wired in
    for blk in m.blocks:
        g = blk.mixer.gate_proj.weight.grad.view(blk.mixer.num_dir, 3, blk.mixer.num_heads, -1)
        assert bool((g.abs().amax(dim=(-1,)) > 0).all())


@pytest.mark.parametrize('name', TINY_NAMES)
@pytest.mark.parametrize('out_indices', [None, (0, 1), (-1,), 2])
def test_features_only(name, out_indices):
    torch.manual_seed(0)
    full = _small(name, depth=4).eval()
    kwargs = {} if out_indices is None else dict(out_indices=out_indices)
    feat = timm.create_model(name, depth=4, num_iter=6, features_only=True, **kwargs).eval()
    # the wrapper holds the model (blocks after the last tap pruned) under 'model.': give it the same weights
    own = feat.state_dict()
    feat.load_state_dict({'model.' + k: v for k, v in full.state_dict().items() if 'model.' + k in own})
    want = {None: [1, 2, 3], (0, 1): [0, 1], (-1,): [3], (0, 2, 3): [0, 2, 3], 2: [2, 3]}[out_indices]
    assert feat.feature_info.channels() == [192] * len(want)
    assert feat.feature_info.reduction() == [16] * len(want)
    assert [f'blocks.{i}' for i in want] == feat.feature_info.module_name()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = feat(x)
        ref = full.forward_intermediates(x, indices=want, intermediates_only=True)
    assert len(outs) == len(want)
    for o, r in zip(outs, ref):
        assert o.shape == (1, 192, 4, 6)  # NCHW at stride 16
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize('name', TINY_NAMES)
def test_forward_intermediates_matches_forward_features(name):
    m = _small(name).eval()
    depth = len(m.blocks)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x)
        assert len(inter) == depth
        torch.testing.assert_close(final, feats, rtol=1e-5, atol=1e-8)
        assert all(t.shape == (2, m.num_features, 3, 4) for t in inter)
        last_normed = m.forward_intermediates(x, indices=1, norm=True, output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(last_normed[0], feats, rtol=1e-5, atol=1e-8)
        early = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])
        m.set_grad_checkpointing()
        final2, inter2 = m.forward_intermediates(x)
    torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)
    for a, b in zip(inter2, inter):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='output_fmt'):
        m.forward_intermediates(x, output_fmt='NLC')


@pytest.mark.parametrize('name', TINY_NAMES)
def test_prune_intermediate_layers(name):
    torch.manual_seed(0)
    m = _small(name, depth=4).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = m.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    kept = m.prune_intermediate_layers(indices=[0, 2], prune_norm=True)
    assert kept == [0, 2]
    assert len(m.blocks) == 3 and isinstance(m.norm, torch.nn.Identity) and isinstance(m.head, torch.nn.Identity)
    assert m.num_classes == 0 and m.global_pool == ''
    m.train()
    taps = m.forward_intermediates(x, indices=kept, intermediates_only=True)
    for a, b in zip(taps, ref):
        torch.testing.assert_close(a, b)
    sum(t.square().mean() for t in taps).backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]


@pytest.mark.parametrize('name', TINY_NAMES)
def test_fx_feature_extractor(name):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    m = _small(name)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(m, tracer_kwargs=tracer_kwargs)
    assert any('mixer' in n for n in eval_nodes)  # the mixer is one leaf node per block
    x = torch.randn(2, 3, 32, 64)
    m.eval()
    fx = create_feature_extractor(m, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[eval_nodes[-1]], m(x))
    # backward through the traced training graph gives the eager gradients
    m.train()
    fx = create_feature_extractor(m, return_nodes=[train_nodes[-1]], tracer_kwargs=tracer_kwargs).train()
    fx(x)[train_nodes[-1]].mean().backward()
    g_fx = {n: p.grad.clone() for n, p in fx.named_parameters()}
    m.zero_grad()
    m(x).mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_fx[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', TINY_NAMES)
def test_dtype_round_trip(name):
    m = _small(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y32 = m(x)
        m.to(torch.float64)
        y64 = m(x.double())
        assert y64.dtype == torch.float64
        assert rel_rmse(y32, y64) < 1e-4
        m.to(torch.float32)  # fp32 → fp64 → fp32 is lossless: a stale cached state would show up as a mismatch
        assert torch.equal(m(x), y32)
        m.to(torch.bfloat16)
        y16 = m(x.bfloat16())
        assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
        assert rel_rmse(y16.float(), y32) < 0.1  # the bf16 model is the fp32 one rounded: close, not merely finite
        m.to(torch.float32)
        assert m(x).dtype == torch.float32


def test_init_weights_after_to_empty():
    m = timm.create_model('gka_tiny_cross', depth=2, device='meta')
    m.to_empty(device='cpu')
    m.init_weights()
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n
    mixer = m.blocks[0].mixer
    a = mixer.A_log.exp()
    assert bool((a > 0).all() and (a <= 16).all())
    dt = F.softplus(mixer.dt_bias)
    assert bool((dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 1e-1 * (1 + 1e-4)).all())
    assert bool((mixer.gate_bias.abs() <= 1 / math.sqrt(192)).all())
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    assert torch.isfinite(m.eval()(torch.randn(1, 3, 32, 32))).all()


# ---------------------------------------------------------------------------------------------------------------
# the mixer against a plain per-direction reference
# ---------------------------------------------------------------------------------------------------------------

def _mixer_reference(mixer: GKAMixer, x: torch.Tensor, backend: str) -> torch.Tensor:
    """GKAMixer written the slow, obvious way: one gka_chunk call per direction on a permuted copy of the tokens."""
    B, h, w, C = x.shape
    H, D, n = mixer.num_heads, mixer.head_dim, mixer.num_dir
    qkv = F.silu(mixer.conv(mixer.qkv(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(B, h * w, 3, H, D)
    q, k, v = l2_normalize(qkv[:, :, 0]), l2_normalize(qkv[:, :, 1]), qkv[:, :, 2]
    W = mixer.gate_proj.weight.view(n, 3, H, C)
    xt = x.reshape(B, h * w, C)
    total = torch.zeros(B, h * w, H, D, dtype=x.dtype)
    for j, d in enumerate(mixer.directions):
        perm = direction_order(d, h, w)
        beta = torch.sigmoid(xt @ W[j, 0].t() + mixer.gate_bias[j, 0]) + BETA_EPS
        alpha = torch.sigmoid(xt @ W[j, 1].t() + mixer.gate_bias[j, 1])
        g = forget_gate_log_decay(xt @ W[j, 2].t(), mixer.A_log[j], mixer.dt_bias[j])  # fp32, as the spec says
        o = gka_chunk(q[:, perm], (k * beta[..., None])[:, perm], (v * beta[..., None])[:, perm], g[:, perm],
                      alpha[:, perm], num_iter=mixer.num_iter, ridge_ratio=mixer.ridge_ratio, backend=backend)
        out = torch.empty_like(o)
        out[:, perm] = o
        total = total + out
    z = mixer.out_gate(x).reshape(B, h * w, H, D)
    return mixer.proj(mixer.norm(total, z).reshape(B, h, w, H * D))


@pytest.mark.parametrize('directions', [('row',), ('col_rev',), ('row', 'row_rev'), DIRECTIONS])
def test_mixer_matches_per_direction_reference(directions):
    mixer = GKAMixer(32, 2, head_dim=16, directions=directions, num_iter=12, ridge_ratio=0.05, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 32, dtype=torch.float64)
    y = mixer(x)
    # same kernel backend: only the stacking / gathering / gating wiring differs, so agreement is to rounding (the
    # log-decay is fp32 by spec, and fp32 exp/softplus may round an ulp differently on differently shaped tensors)
    assert rel_rmse(y, _mixer_reference(mixer, x, 'torch')) < 1e-7
    # the token-loop oracle (a different summation order of the same math)
    assert rel_rmse(y, _mixer_reference(mixer, x, 'naive')) < 1e-6


def test_mixer_makes_one_stacked_kernel_call(monkeypatch):
    calls = []

    def spy(q, k, v, g, alpha, num_iter, ridge_ratio, backend, rebuild_from=None):
        calls.append((tuple(q.shape), dict(num_iter=num_iter, ridge_ratio=ridge_ratio)))
        return gka_chunk(q, k, v, g, alpha, num_iter=num_iter, ridge_ratio=ridge_ratio, backend=backend)

    monkeypatch.setattr(mixer_module, '_gka_kernel', spy)
    mixer = GKAMixer(32, 2, head_dim=16, directions=('row', 'row_rev', 'col', 'col_rev'), num_iter=7,
                     ridge_ratio=0.03)
    mixer(torch.randn(3, 4, 5, 32))
    assert len(calls) == 1
    shape, kw = calls[0]
    assert shape == (3 * 4, 20, 2, 16)  # four directions stacked on the batch axis
    assert kw['num_iter'] == 7 and kw['ridge_ratio'] == 0.03


@pytest.mark.parametrize('channels_last', [False, True])
def test_residual_stream_is_contiguous(channels_last):
    """The token grid leaves the embedding and every block contiguous in NHWC, whatever the image's memory format:
    a permuted residual stream makes each LayerNorm copy it and each residual add take the strided path."""
    m = timm.create_model('gka_tiny', img_size=64, depth=2)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = m._embed(x)
    assert t.is_contiguous()
    for blk in m.blocks:
        t = blk(t)
        assert t.is_contiguous()


def test_embedded_tokens_are_freed_after_the_first_block():
    """Inference keeps one residual stream alive, not also the embedded tokens: forward_features runs the blocks in a
    loop (a Sequential's call holds its input until the last block returns: 96 MiB of gka_small's peak at 1024 px,
    batch 16). Checked with a weak reference to the embedding's output, taken before the second block runs."""
    import weakref
    m = timm.create_model('gka_tiny', img_size=64, depth=3).eval()
    refs, alive = [], []
    m.pos_drop.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    m.blocks[1].register_forward_pre_hook(lambda mod, inp: alive.append(refs[-1]() is not None))
    with torch.no_grad():
        m.forward_features(torch.randn(2, 3, 64, 64))
    assert alive == [False]


def test_normalised_grid_is_freed_before_the_kernel(monkeypatch):
    """Without autograd the block's pre-norm output (fp32 under autocast) is gone when the GKA kernel runs: the mixer
    applies the norm itself and drops it after the projections (48 MiB net of gka_small's peak at 1024 px)."""
    import weakref
    from gka_vision.models import mixer as mixer_mod
    m = timm.create_model('gka_tiny', img_size=64, depth=1).eval()
    refs, alive = [], []
    m.blocks[0].norm1.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    kernel = mixer_mod._gka_kernel

    def spy(*args, **kwargs):
        alive.append(refs[-1]() is not None)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(mixer_mod, '_gka_kernel', spy)
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    assert alive == [False]


def test_fused_glue_switch(monkeypatch):
    """The fused glue kernels are the default on CUDA only; GKA_FUSED_GLUE=0 always keeps the PyTorch glue and a
    head dim without a power-of-two tile falls back to it."""
    x = torch.randn(2, 4)
    monkeypatch.delenv('GKA_FUSED_GLUE', raising=False)
    assert not mixer_module._fused_glue(x, 64)      # a CPU tensor: PyTorch glue unless forced
    monkeypatch.setenv('GKA_FUSED_GLUE', '0')
    assert not mixer_module._fused_glue(x, 64)
    pytest.importorskip('triton', reason='forcing the fused glue needs triton (interpreted on a CPU)')
    monkeypatch.setenv('GKA_FUSED_GLUE', '1')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert mixer_module._fused_glue(x, 64) and not mixer_module._fused_glue(x, 48)


def test_mixer_frees_its_projections_before_the_kernel(monkeypatch):
    """Without autograd the qkv projection and the conv output are gone when the GKA kernel runs: they are the
    largest tensors of the mixer besides the kernel's own inputs (3·H·D per token each), so keeping either one
    raises the inference peak."""
    import weakref
    seen = {}

    def spy(q, k, v, g, alpha, num_iter, ridge_ratio, backend, rebuild_from=None):
        seen['alive'] = {name: ref() is not None for name, ref in refs.items()}
        return gka_chunk(q, k, v, g, alpha, num_iter=num_iter, ridge_ratio=ridge_ratio, backend=backend)

    mixer = GKAMixer(32, 2, head_dim=16, directions=('row', 'row_rev'), num_iter=3)
    refs = {}
    mixer.qkv.register_forward_hook(lambda m, i, o: refs.__setitem__('qkv', weakref.ref(o)))
    mixer.conv.register_forward_hook(lambda m, i, o: refs.__setitem__('conv', weakref.ref(o)))
    monkeypatch.setattr(mixer_module, '_gka_kernel', spy)
    with torch.no_grad():
        mixer(torch.randn(2, 4, 5, 32))
    assert seen['alive'] == {'qkv': False, 'conv': False}


def test_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match='directions'):
        GKAMixer(16, 2, directions=('row', 'diag'))
    with pytest.raises(ValueError, match='num_iter'):
        GKAMixer(16, 2, num_iter=2.5)
    with pytest.raises(ValueError, match='ridge_ratio'):
        GKAMixer(16, 2, ridge_ratio=-1)
    with pytest.raises(ValueError, match='conv_size'):
        GKAMixer(16, 2, conv_size=2)


# ---------------------------------------------------------------------------------------------------------------
# scan order at the model level
# ---------------------------------------------------------------------------------------------------------------

def _corner_influence(model):
    """|Δ forward_features at the top-left token| when only the bottom-right patch of the image changes."""
    x = torch.randn(1, 3, 64, 64)
    x2 = x.clone()
    x2[..., 48:, 48:] += torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        return (model.forward_features(x)[0, 0, 0] - model.forward_features(x2)[0, 0, 0]).abs().max().item()


def test_bidirectional_model_is_not_causal():
    # 4×4 grid, one block: the 3×3 conv alone cannot carry the bottom-right patch to the top-left token
    assert _corner_influence(timm.create_model('gka_tiny', depth=1).eval()) > 1e-6
    assert _corner_influence(timm.create_model('gka_tiny_cross', depth=1).eval()) > 1e-6
    # the first 'alt' block scans row-major forward only: the last token cannot reach the first one
    assert _corner_influence(timm.create_model('gka_tiny_alt', depth=1).eval()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# input sizes
# ---------------------------------------------------------------------------------------------------------------

def test_image_size_rules():
    m = timm.create_model('gka_tiny', depth=1).eval()
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 48, 80)).shape == (1, 3, 5, 192)  # dynamic_img_size default
        with pytest.raises(ValueError, match='not divisible by the patch size'):
            m(torch.randn(1, 3, 50, 64))
        with pytest.raises(ValueError, match='smaller than one patch'):
            m(torch.randn(1, 3, 8, 64))
        with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
            m(torch.randn(3, 64, 64))
        padded = timm.create_model('gka_tiny', depth=1, dynamic_img_pad=True).eval()
        assert padded.forward_features(torch.randn(1, 3, 37, 21)).shape == (1, 3, 2, 192)
        assert padded.forward_features(torch.randn(1, 3, 5, 5)).shape == (1, 1, 1, 192)
        fixed = timm.create_model('gka_tiny', depth=1, dynamic_img_size=False, img_size=64).eval()
        assert fixed(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        with pytest.raises(ValueError, match='does not match the model'):
            fixed(torch.randn(1, 3, 64, 32))
        fixed.set_input_size(img_size=(32, 96))
        assert fixed.pos_embed.shape == (1, 2, 6, 192)
        assert fixed.forward_features(torch.randn(1, 3, 32, 96)).shape == (1, 2, 6, 192)


def test_dynamic_size_uses_resampled_pos_embed():
    m = timm.create_model('gka_tiny', depth=1, img_size=64).eval()
    x = torch.randn(1, 3, 96, 64)
    fixed = timm.create_model('gka_tiny', depth=1, img_size=(96, 64), dynamic_img_size=False).eval()
    fixed.load_state_dict(checkpoint_filter_fn(m.state_dict(), fixed))
    with torch.no_grad():
        torch.testing.assert_close(m(x), fixed(x))


# ---------------------------------------------------------------------------------------------------------------
# weights: safetensors, train.py checkpoints, resolution change
# ---------------------------------------------------------------------------------------------------------------

def test_state_dict_round_trips_through_safetensors(tmp_path):
    m = _small('gka_tiny_cross').eval()
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    x = torch.randn(1, 3, 32, 32)
    other = _small('gka_tiny_cross').eval()
    load_checkpoint(other, str(path))
    with torch.no_grad():
        assert torch.equal(other(x), m(x))
    third = timm.create_model('gka_tiny_cross', depth=2, num_iter=6, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(third(x), m(x))


def test_train_checkpoint_at_224_loads_into_320(tmp_path):
    src = timm.create_model('gka_tiny', depth=2)
    # what timm's train.py writes: weights nested under state_dict / state_dict_ema beside args and optimizer state
    ema = {k: v + 0.01 for k, v in src.state_dict().items()}
    ckpt = dict(epoch=3, arch='gka_tiny', state_dict=src.state_dict(), state_dict_ema=ema,
                args=argparse.Namespace(model='gka_tiny', lr=1e-3), optimizer={'state': {}, 'param_groups': []})
    path = tmp_path / 'checkpoint-3.pth.tar'
    torch.save(ckpt, path)

    m = timm.create_model('gka_tiny', depth=2, img_size=320, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert m.pos_embed.shape == (1, 20, 20, 192)
    want = F.interpolate(ema['pos_embed'].permute(0, 3, 1, 2), size=(20, 20), mode='bicubic', antialias=True,
                         align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(m.pos_embed.data, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.blocks[1].mixer.A_log.data, ema['blocks.1.mixer.A_log'])  # EMA weights preferred
    torch.testing.assert_close(m.head.weight.data, ema['head.weight'])
    # a different class count drops the classifier (timm's load_pretrained), the backbone still loads
    m5 = timm.create_model('gka_tiny', depth=2, img_size=320, num_classes=5, pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m5.patch_embed.proj.weight.data, ema['patch_embed.proj.weight'])
    assert m5.head.weight.shape == (5, 192)
    with torch.no_grad():
        assert torch.isfinite(m5.eval()(torch.randn(1, 3, 320, 320))).all()
    # DDP prefixes and flat [1, N, C] embeddings are understood as well
    flat = {'module.' + k: (v.reshape(1, -1, 192) if k == 'pos_embed' else v) for k, v in src.state_dict().items()}
    sd = checkpoint_filter_fn(flat, m)
    assert sd['pos_embed'].shape == (1, 20, 20, 192) and 'blocks.0.mixer.qkv.weight' in sd


# ---------------------------------------------------------------------------------------------------------------
# precision and compilation
# ---------------------------------------------------------------------------------------------------------------

def test_bf16_autocast_forward_is_finite():
    m = _small('gka_tiny_cross').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(x)
    assert torch.isfinite(y).all()
    assert rel_rmse(y.float(), ref) < 0.1


def test_mixer_casts_the_normalised_grid_once_under_autocast(monkeypatch):
    """Under autocast the mixer's three input projections read one low-precision copy of the normalised grid
    (layers.autocast_fanout), where autocast alone casts and saves one per Linear: the same outputs bit for bit and
    the same gradients, and one saved [B, Hg, Wg, d] bf16 copy per block instead of three."""
    from gka_vision import layers
    torch.manual_seed(0)
    # 4-px patches: the patch GEMM's input [tokens, 3·p²] is then not [tokens, d]-shaped (as 8-px patches would be)
    m = timm.create_model('gka_tiny_cross', img_size=32, patch_size=4, depth=2, num_iter=4, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    tokens = 2 * 8 * 8

    def step():
        saved = []
        m.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append((tuple(t.shape), t.dtype, t.data_ptr())) or t, lambda t: t):
            y = m(x)
        y.float().square().sum().backward()
        # distinct bf16 [tokens, d] inputs the Linears keep (views of one tensor share its data pointer)
        copies = {p for shape, dt, p in saved if shape == (tokens, m.embed_dim) and dt == torch.bfloat16}
        return y.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, len(copies)

    y1, g1, n1 = step()
    monkeypatch.setattr(layers._CastFanout, 'apply', lambda x, dtype, n: (x,) * n)   # autocast's own casts
    y0, g0, n0 = step()
    assert torch.equal(y1, y0)
    for k, gr in g0.items():
        assert rel_rmse(g1[k], gr) < 1e-6, k
    # per block, in both: the mixer's output projection and the MLP's fc1 (their own inputs); the mixer's three
    # input projections 3 copies with autocast alone, 1 here
    assert (n0, n1) == (2 * 5, 2 * 3), (n0, n1)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    m = timm.create_model('gka_tiny_cross', depth=2, embed_dim=64, num_heads=2, head_dim=32, num_iter=4).train()
    x = torch.randn(2, 3, 32, 48)
    ref = m(x)
    ref.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # The torch backend (the CPU's) is opaque to dynamo (one graph break per mixer); everything around it is
    # captured. The triton backend compiles without a break (test_triton_interpret.py).
    # aot_eager runs dynamo + AOT autograd (what inductor consumes) without minutes of C++ codegen on 2 cores.
    explained = torch._dynamo.explain(m)(x)
    reasons = [r.reason for r in explained.break_reasons]
    assert reasons and all('_torch_backend' in r for r in reasons), reasons
    torch._dynamo.reset()
    cm = torch.compile(m, backend='aot_eager')
    y = cm(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-7)
