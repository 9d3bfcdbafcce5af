"""Causal GKA language model: ``GKAConfig``, ``GKAForCausalLM`` (forward with a recurrent cache, ``generate``,
``save_pretrained`` / ``from_pretrained``)."""
from .cache import GKACache, GKALayerCache
from .config import GKAConfig
from .mixer import CausalShortConv, GKACausalMixer
from .model import CausalLMOutput, GKAForCausalLM, LMBlock, SwiGLU

__all__ = ['GKAConfig', 'GKAForCausalLM', 'GKACache', 'GKALayerCache', 'GKACausalMixer', 'CausalShortConv',
           'CausalLMOutput', 'LMBlock', 'SwiGLU']
