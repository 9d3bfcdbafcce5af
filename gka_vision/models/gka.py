"""GKA vision backbones: Gated KalmaNet token mixers in an isotropic DeiT skeleton.

Paper: `Gated KalmaNet: A Fading Memory Layer Through Test-Time Ridge Regression` - https://arxiv.org/abs/2511.21016
(Peng, Chattopadhyay, Zancato, Nunez, Xia, Soatto; CVPR 2026). The paper's layer is causal (language); here it
mixes image tokens along scan orders of the patch grid (scan.py), after a depthwise 3×3 conv (mixer.py).

Skeleton as DeiT (`Training data-efficient image transformers & distillation through attention`,
https://arxiv.org/abs/2012.12877): patch 16, depth 12, widths 192 / 384 / 768, head dim 64, MLP ratio 4, pre-norm
residual blocks; average pooling and no class token; an optional learned absolute position embedding that is
resampled to the runtime grid.

Tokens stay NHWC ([B, H, W, C]) through the network, so ``forward_features`` returns NHWC (``output_fmt``);
``forward_intermediates`` and ``features_only`` give NCHW maps of stride 16 by default.

TorchScript is not supported (the kernel is a Python-dispatched autograd.Function); ``torch.compile`` and
torchvision's FX feature extraction are.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerType, Mlp, get_act_layer, get_norm_layer, resample_abs_pos_embed_nhwc,
    resample_patch_embed, trunc_normal_,
)
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models import register_notrace_function
from timm.models._features import feature_take_indices

from .add_norm import add_layer_norm
from .mixer import GKAMixer
from .patch_embed import GemmPatchEmbed
from .scan import block_directions, check_scan

try:  # timm >= 1.0.30 records a resize in the model's traits
    from timm.models._input import update_model_input_size
except ImportError:  # pragma: no cover - older timm
    update_model_input_size = None

__all__ = ['GKANet', 'GKABlock', 'checkpoint_filter_fn']

_GLOBAL_POOLS = ('', 'avg', 'max')


class TorchScriptUnsupportedError(RuntimeError):
    """Raised by ``torch.jit.script`` on a GKA model."""


@register_notrace_function  # a leaf for FX: it branches on the (symbolic) input shape
def check_image_size(
        x: torch.Tensor,
        patch_size: Tuple[int, int],
        img_size: Optional[Tuple[int, int]],
        dynamic_img_size: bool,
        dynamic_img_pad: bool,
) -> torch.Tensor:
    """Raise a clear ValueError for an image the patch embedding cannot take; return ``x`` unchanged."""
    if x.dim() != 4:
        raise ValueError(f'x must be an image batch [B, C, H, W], got shape {list(x.shape)}')
    H, W = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = patch_size
    if not dynamic_img_size and img_size is not None:
        if (H, W) != tuple(img_size):
            raise ValueError(
                f'image size ({H}, {W}) does not match the model ({img_size[0]}, {img_size[1]}); build the model '
                f'with dynamic_img_size=True (any multiple of the patch size {ph}x{pw}) or call set_input_size()')
        return x
    if dynamic_img_pad:
        if H < 1 or W < 1:
            raise ValueError(f'image size ({H}, {W}) is empty')
        return x
    if H < ph or W < pw:
        raise ValueError(
            f'image size ({H}, {W}) is smaller than one patch ({ph}x{pw}); use dynamic_img_pad=True to pad it')
    if H % ph or W % pw:
        raise ValueError(
            f'image size ({H}, {W}) is not divisible by the patch size ({ph}x{pw}); resize or crop it, or build the '
            f'model with dynamic_img_pad=True to zero-pad up to a multiple of the patch')
    return x


class GKABlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm1(x))), then x + drop_path(mlp(norm2(x))). NHWC in and out.

    Args:
        dim: Width d.
        num_heads: Mixer heads.
        head_dim: Mixer head dim.
        directions: Scan directions of this block's mixer.
        mlp_ratio: MLP hidden width / d.
        num_iter: Chebyshev iterations of the ridge solve.
        ridge_ratio: r in λ_t = r·‖H_t‖_F.
        proj_drop: Dropout after the mixer projection and in the MLP.
        drop_path: Stochastic depth rate.
        act_layer: MLP activation.
        norm_layer: Normalisation before the mixer and the MLP.
        mlp_layer: MLP class.
        backend: gka_chunk backend (None = default).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int = 64,
            directions: Sequence[str] = ('row', 'row_rev'),
            mlp_ratio: float = 4.,
            num_iter: int = 30,
            ridge_ratio: float = 0.02,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            backend: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = GKAMixer(
            dim,
            num_heads,
            head_dim=head_dim,
            directions=directions,
            num_iter=num_iter,
            ridge_ratio=ridge_ratio,
            proj_drop=proj_drop,
            backend=backend,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mixer applies norm1 (GKAMixer.forward); the residual add and norm2 are one kernel on CUDA under
        # autocast (add_norm.py)
        x, h = add_layer_norm(x, self.drop_path1(self.mixer(x, self.norm1)), self.norm2)
        return x + self.drop_path2(self.mlp(h))


class GKANet(nn.Module):
    """Isotropic GKA backbone (DeiT skeleton, GKA token mixer, average pooling, no class token).

    Args:
        img_size: Native input size (the position embedding's grid; with ``dynamic_img_size`` any multiple of the
            patch size works).
        patch_size: Patch size (the stride of every feature map).
        in_chans: Input channels.
        num_classes: Classifier outputs (0 = no classifier).
        global_pool: '' (none: NHWC map out of forward_head), 'avg' or 'max'.
        embed_dim: Width d.
        depth: Number of blocks.
        num_heads: Mixer heads per block.
        head_dim: Mixer head dim.
        mlp_ratio: MLP hidden width / d.
        scan: Scan order: 'bi', 'cross' or 'alt' (scan.py).
        num_iter: Chebyshev iterations of the ridge solve.
        ridge_ratio: r in λ_t = r·‖H_t‖_F.
        pos_embed: Learned absolute position embedding ('learn') or none ('none').
        dynamic_img_size: Accept any image size divisible by the patch (position embedding resampled per grid).
        dynamic_img_pad: Zero-pad the image up to a multiple of the patch (any size at all).
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after the position embedding.
        proj_drop_rate: Dropout in the mixer projection and the MLP.
        drop_path_rate: Stochastic depth rate (linear in depth).
        norm_layer: Normalisation layer (default LayerNorm, eps 1e-6).
        act_layer: MLP activation (default GELU).
        mlp_layer: MLP class.
        block_fn: Block class.
        backend: gka_chunk backend (None = triton on CUDA when available, torch elsewhere).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            head_dim: int = 64,
            mlp_ratio: float = 4.,
            scan: str = 'bi',
            num_iter: int = 30,
            ridge_ratio: float = 0.02,
            pos_embed: str = 'learn',
            dynamic_img_size: bool = True,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[LayerType] = None,
            act_layer: Optional[LayerType] = None,
            mlp_layer: Type[nn.Module] = Mlp,
            block_fn: Type[nn.Module] = GKABlock,
            backend: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_scan(scan)
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}')
        if pos_embed not in ('learn', 'none'):
            raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        if depth < 1:
            raise ValueError(f'depth must be >= 1, got {depth}')
        norm_layer = get_norm_layer(norm_layer) or nn.LayerNorm
        if norm_layer is nn.LayerNorm:
            norm_layer = _layer_norm_eps6
        act_layer = get_act_layer(act_layer) or nn.GELU

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.scan = scan
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False

        self.patch_embed = GemmPatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt='NHWC',
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            **dd,
        )
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.empty(1, grid[0], grid[1], embed_dim, **dd)) \
            if pos_embed == 'learn' else None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.Sequential(*[
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                head_dim=head_dim,
                directions=block_directions(scan, i),
                mlp_ratio=mlp_ratio,
                num_iter=num_iter,
                ridge_ratio=ridge_ratio,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                mlp_layer=mlp_layer,
                backend=backend,
                **dd,
            )
            for i in range(depth)])
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights(needs_reset=False)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first; fail with a message instead of a compiler trace from deep inside.
        raise TorchScriptUnsupportedError(
            f'{type(self).__name__} does not support TorchScript: the GKA kernel (gka_kernels.gka_chunk) is a '
            f'Python-dispatched autograd.Function that torch.jit.script cannot compile. Use torch.compile, '
            f'torch.export or torchvision FX instead.')

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """(Re)initialise every parameter, e.g. after ``to_empty()``.

        Linear layers of the MLP and the head: truncated normal (std .02) and zero bias, as DeiT; the mixer:
        gka_spec.md §2 (``GKAMixer.reset_parameters``); position embedding: truncated normal (std .02).

        Args:
            mode: Only '' is supported (kept for timm API compatibility).
            needs_reset: Also reset modules that hold their own init (norms, the patch-embedding conv, mixers).
        """
        if mode not in ('', 'jax'):
            raise ValueError(f"init mode must be '' (or 'jax', treated the same), got {mode!r}")
        if needs_reset:
            for m in self.modules():
                if m is not self and hasattr(m, 'reset_parameters'):
                    m.reset_parameters()
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and (name == 'head' or '.mlp.' in name):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # A_log / dt_bias are gate parameters (spec §2 step 7); A_log is 2-D so the 1-D rule would miss it.
        return {'pos_embed', 'blocks.*.mixer.A_log', 'blocks.*.mixer.dt_bias'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0``: none) and optionally the pooling ('' keeps the NHWC map)."""
        if global_pool is not None:
            if global_pool not in _GLOBAL_POOLS:
                raise ValueError(f'global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}')
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes, **get_device_dtype(self))
            trunc_normal_(head.weight, std=.02)
            nn.init.zeros_(head.bias)
            head.train(self.training)
            self.head = head
        else:
            self.head = nn.Identity()

    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Change the native image size (and optionally the patch size); resamples the position embedding."""
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid = self.patch_embed.grid_size
        if self.pos_embed is not None and tuple(self.pos_embed.shape[1:3]) != tuple(grid):
            with torch.no_grad():
                new = resample_abs_pos_embed_nhwc(self.pos_embed, new_size=list(grid))
            self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info['reduction'] = reduction
        if update_model_input_size is not None:
            update_model_input_size(self, self.patch_embed.img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, C, H, W] → position-embedded token grid [B, Hg, Wg, d]."""
        x = check_image_size(
            x, self.patch_embed.patch_size, self.patch_embed.img_size, self.dynamic_img_size, self.dynamic_img_pad)
        # the convolution's NHWC output is a permuted view of NCHW (the GEMM's is contiguous already); made
        # contiguous once here, or the whole residual stream inherits that layout and every LayerNorm copies it
        # (12 % of gka_small's inference at 1024 px on the H200)
        x = self.patch_embed(x).contiguous()
        if self.pos_embed is not None:
            if self.dynamic_img_size:
                x = x + resample_abs_pos_embed_nhwc(self.pos_embed, new_size=[x.shape[1], x.shape[2]])
            else:
                x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of selected blocks.

        Args:
            x: Images [B, C, H, W].
            indices: Last n blocks if an int, explicit block indices if a sequence, all blocks if None.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last selected block (the final features are then not the model's).
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the list of intermediates.

        Returns:
            The intermediates, or (final NHWC features after the norm, intermediates).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        intermediates = []
        x = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and optionally the final norm / head).

        Returns:
            The absolute block indices that ``indices`` selects.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → normalised token grid [B, H/16, W/16, d] (NHWC)."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            # a loop, not self.blocks(x): the Sequential's call would hold its input, the embedded tokens, until the
            # last block returns (one fp32 [B, L, d] tensor on the inference peak: 96 MiB at 1024 px, batch 16)
            for blk in self.blocks:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features → pooled (and classified) output; ``pre_logits`` stops before the classifier."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        elif self.global_pool == 'max':
            x = x.amax(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def _layer_norm_eps6(dim: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _unwrap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    # train.py checkpoints nest the weights (and hold args / optimizer state beside them); prefer the EMA weights.
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner:
            state_dict = inner
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len('module.'):] if k.startswith('module.') else k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: GKANet) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: unwrap train.py checkpoints (EMA weights first), strip DDP's ``module.``,
    resample the position embedding to the model's grid and the patch-embedding kernel to its patch size."""
    state_dict = _unwrap_checkpoint(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k == 'pos_embed' and model.pos_embed is not None and v.shape != model.pos_embed.shape:
            if v.dim() == 3:  # a flat [1, N, C] embedding of a square grid
                side = int(round(v.shape[1] ** 0.5))
                if side * side != v.shape[1]:
                    raise ValueError(f'pos_embed of shape {list(v.shape)} is not a square grid')
                v = v.reshape(1, side, side, v.shape[-1])
            v = resample_abs_pos_embed_nhwc(v, new_size=list(model.pos_embed.shape[1:3]))
        elif k == 'patch_embed.proj.weight' and v.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            v = resample_patch_embed(v, list(model.patch_embed.proj.weight.shape[-2:]), verbose=False)
        out[k] = v
    return out


def _create_gka(variant: str, pretrained: bool = False, **kwargs) -> GKANet:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        GKANet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (14, 14),
        'fixed_input_size': False,
        'crop_pct': .875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2511.21016',
        'paper_name': 'Gated KalmaNet: A Fading Memory Layer Through Test-Time Ridge Regression',
        **kwargs,
    }


# No weights are published yet: the cfgs carry data / head metadata only (no hub id, so nothing is downloaded).
default_cfgs = generate_default_cfgs({
    'gka_tiny': _cfg(),
    'gka_small': _cfg(),
    'gka_base': _cfg(),
    'gka_tiny_cross': _cfg(),
    'gka_small_cross': _cfg(),
    'gka_base_cross': _cfg(),
    'gka_tiny_alt': _cfg(),
    'gka_small_alt': _cfg(),
    'gka_base_alt': _cfg(),
})

_SIZES = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3, head_dim=64),
    'small': dict(embed_dim=384, depth=12, num_heads=6, head_dim=64),
    'base': dict(embed_dim=768, depth=12, num_heads=12, head_dim=64),
}


@register_model
def gka_tiny(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-T: DeiT-T skeleton, bidirectional row-major scan."""
    model_args = dict(_SIZES['tiny'], scan='bi')
    return _create_gka('gka_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_small(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-S: DeiT-S skeleton, bidirectional row-major scan."""
    model_args = dict(_SIZES['small'], scan='bi')
    return _create_gka('gka_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_base(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-B: DeiT-B skeleton, bidirectional row-major scan."""
    model_args = dict(_SIZES['base'], scan='bi')
    return _create_gka('gka_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_tiny_cross(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-T with the cross scan (row- and column-major, each both ways)."""
    model_args = dict(_SIZES['tiny'], scan='cross')
    return _create_gka('gka_tiny_cross', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_small_cross(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-S with the cross scan (row- and column-major, each both ways)."""
    model_args = dict(_SIZES['small'], scan='cross')
    return _create_gka('gka_small_cross', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_base_cross(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-B with the cross scan (row- and column-major, each both ways)."""
    model_args = dict(_SIZES['base'], scan='cross')
    return _create_gka('gka_base_cross', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_tiny_alt(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-T with the alternating scan (one of four directions per block)."""
    model_args = dict(_SIZES['tiny'], scan='alt')
    return _create_gka('gka_tiny_alt', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_small_alt(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-S with the alternating scan (one of four directions per block)."""
    model_args = dict(_SIZES['small'], scan='alt')
    return _create_gka('gka_small_alt', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gka_base_alt(pretrained: bool = False, **kwargs) -> GKANet:
    """GKA-B with the alternating scan (one of four directions per block)."""
    model_args = dict(_SIZES['base'], scan='alt')
    return _create_gka('gka_base_alt', pretrained=pretrained, **dict(model_args, **kwargs))
