"""timm's PatchEmbed with its projection run as one GEMM over the image's patches.

A patch embedding is a convolution whose kernel equals its stride, i.e. a linear map of each non-overlapping patch.
For 3-channel bf16 inputs cuDNN picks an implicit-GEMM kernel for it that ran at ~19 TFLOP/s on the H200: 2.1 ms of
gka_small's (and DeiT-S's) 1024-px forward at batch 16, as long as a whole transformer block
(benchmarks/KERNEL_NOTES.md, "Model glue"). Unfolding the patches and calling ``F.linear`` computes the same sums
with the same weights, so state dicts, timm's checkpoint filters and ``resample_patch_embed`` are unchanged.
The GEMM runs on CUDA tensors; on the CPU oneDNN's convolution is faster (0.38 against 0.66 ms for one 224-px image
on 2 cores). ``GKA_PATCH_GEMM=1`` uses the GEMM on any device (tests), ``0`` keeps the convolution (benchmarks).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_notrace_module

from ..layers import autocast_enabled

__all__ = ['PatchConv2d', 'GemmPatchEmbed']


@register_notrace_module  # an FX leaf: its path depends on the input's shape and the environment
class PatchConv2d(nn.Conv2d):
    """A Conv2d that computes kernel == stride, unpadded, undilated, ungrouped convolutions of CUDA tensors as a GEMM
    over the patches; anything else runs the convolution. Returns NCHW with channels-last strides, so timm's
    NCHW → NHWC step is a view."""

    def _is_patchify(self) -> bool:
        return (self.kernel_size == self.stride and self.dilation == (1, 1) and self.groups == 1
                and isinstance(self.padding, tuple) and all(p == 0 for p in self.padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        switch = os.environ.get('GKA_PATCH_GEMM')
        use_gemm = x.is_cuda if switch is None else switch != '0'
        if not use_gemm or x.dim() != 4 or not self._is_patchify():
            return super().forward(x)
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f'patch embedding expects {self.in_channels} input channels, got x of shape '
                             f'{tuple(x.shape)}')
        ph, pw = self.kernel_size
        gh, gw = H // ph, W // pw
        dev = x.device.type
        # cast before the patch copy, as F.linear under autocast would after it: half the bytes moved
        if autocast_enabled(dev) \
                and x.dtype in (torch.float32, torch.float16, torch.bfloat16):   # autocast leaves float64 alone
            x = x.to(torch.get_autocast_dtype(dev))
        # a strided conv drops the pixels past the last whole patch
        x = x[:, :, :gh * ph, :gw * pw]
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh, gw, C * ph * pw)
        y = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return y.permute(0, 3, 1, 2)


def _as_patch_conv(conv: nn.Module) -> nn.Module:
    """The same parameters (the very Parameter objects) under PatchConv2d; other modules are returned as they are."""
    if type(conv) is not nn.Conv2d:
        return conv
    new = PatchConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, device='meta')
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


class GemmPatchEmbed(PatchEmbed):
    """timm's PatchEmbed (same arguments, checks and outputs) with a PatchConv2d projection, kept across
    ``set_input_size`` (which builds a new Conv2d when the patch size changes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj = _as_patch_conv(self.proj)

    def set_input_size(self, *args, **kwargs):
        super().set_input_size(*args, **kwargs)
        self.proj = _as_patch_conv(self.proj)
