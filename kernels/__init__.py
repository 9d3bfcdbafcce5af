"""gka_kernels: the Gated KalmaNet operator (gka_spec.md), shared by the vision backbones and the language model.

``gka_chunk`` runs a whole sequence, ``gka_step`` one token from a state. Backends: ``triton`` (CUDA),
``torch`` (chunked PyTorch, any device) and ``naive`` (token-by-token reference, the test oracle).
"""
from .api import BACKENDS, gka_chunk, gka_step, resolve_backend
from .validation import GKAInputError

__version__ = '0.1.0'
__all__ = ['gka_chunk', 'gka_step', 'BACKENDS', 'resolve_backend', 'GKAInputError']
