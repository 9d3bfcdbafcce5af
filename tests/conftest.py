"""Shared test configuration: the `gpu` mark skips without CUDA; seeds are fresh per test but reproducible."""
from __future__ import annotations

import os
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU: run `pytest -m gpu` on the GPU machine (benchmarks/gpu_suite.sh)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test draws its own random inputs, seeded from its node id so a failure reproduces."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get('GKA_TEST_SEED', '0'))
    torch.manual_seed(seed)
    yield


def pytest_configure(config):
    # Threads beyond the 2 cores of the CI machine only add contention.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


@pytest.fixture
def spy(monkeypatch):
    """spy(owner, name, record=None) wraps owner.name for the test: each call still runs the original and appends
    record(*args) (1 without a record function) to the list it returns."""
    def install(owner, name, record=None):
        calls, original = [], getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(record(*args) if record is not None else 1)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
        return calls
    return install
