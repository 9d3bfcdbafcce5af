"""gka_vision: Gated KalmaNet vision backbones for timm, and a causal GKA language model.

``import gka_vision`` registers the models with timm (``timm.list_models('gka*')``).
"""
__version__ = '0.1.0'

from . import models  # noqa: E402,F401  (registers gka_* with timm)
