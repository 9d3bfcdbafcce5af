"""Chunked PyTorch implementation of GKA: the CPU path, runs on any device. Forward batches the solve over all
chunks at once; backward is the implicit gradient of gka_spec.md §5 (no unrolled iterations)."""
from .function import gka_chunk_torch
from .decode import gka_step_torch

__all__ = ['gka_chunk_torch', 'gka_step_torch']
