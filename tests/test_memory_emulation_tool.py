"""benchmarks/memory_emulation.py: the CPU emulation of the CUDA path's inference allocation peak runs and counts
what a block must hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emulate(tmp_path, *args: str, **env_vars: str) -> dict:
    """The JSON row of one memory_emulation.py run on gka_tiny, batch 2 (in a subprocess: the tool fixes the
    interpreter mode and the backend before importing anything); env_vars: more environment."""
    pytest.importorskip('triton', reason='the emulation runs the Triton code path in the interpreter')
    out = tmp_path / f'mem{len(list(tmp_path.iterdir()))}.json'
    env = dict(os.environ, TRITON_INTERPRET='1', **env_vars)
    env.pop('GKA_BACKEND', None)
    subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'memory_emulation.py'), '--models', 'gka_tiny',
                    '--batch', '2', *args, '--out', str(out)], check=True, env=env, cwd=ROOT, timeout=600,
                   capture_output=True)
    return json.loads(out.read_text())['rows'][0]


def test_emulated_peak_holds_a_block_of_streams(tmp_path):
    row = _emulate(tmp_path, '--size', '64', '--top', '4')
    # at least q, k, v and the output of both directions (bf16, [2·2, 16, 3, 64]) and the fp32 residual stream
    # ([2, 4, 4, 192]); the GKA kernel's own tensors show up by name
    B, L, n, H, D, d = 2, 16, 2, 3, 64, 192
    floor = 4 * (B * n * L * H * D * 2) + B * L * d * 4
    assert row['peak_bytes'] >= floor
    assert row['at_peak'] and all(t['mib'] >= 0 for t in row['at_peak'])


def test_training_peak_holds_what_the_backward_needs(tmp_path):
    """--mode train: at the peak of a training step (forward and backward) every block still holds the solve's fp32
    iterate of both directions, so the peak is well above the inference peak; the kernel's q, k, v are rebuilt in
    the backward (scan_qkv.rebuild_qkv_in_backward), so only the block being differentiated holds them, where
    GKA_REBUILD_QKV=0 keeps every block's."""
    peaks = {mode: _emulate(tmp_path, '--size', '224', '--mode', mode, '--top', '2000') for mode in ('infer', 'train')}
    kept = _emulate(tmp_path, '--size', '224', '--mode', 'train', '--top', '2000', GKA_REBUILD_QKV='0')
    train = peaks['train']
    B, L, n, H, D, depth = 2, 196, 2, 3, 64, 12
    qkv = 3 * (B * n * L * H * D * 2)     # bf16, both directions
    x = B * n * L * H * D * 4              # the solve's fp32 iterate
    assert train['mode'] == 'train' and train['peak_bytes'] >= depth * x + peaks['infer']['peak_bytes']
    assert kept['peak_bytes'] >= train['peak_bytes'] + (depth - 2) * qkv
    shape = [B * n, L, H, D]

    def alive(row, dtype):
        return [t for t in row['at_peak'] if t['shape'] == shape and t['dtype'] == dtype]

    # the block whose backward runs at the peak may have released some of its own
    assert len(alive(train, 'torch.float32')) >= depth - 1
    # bf16 [B·n, L, H, D]: each block's kernel output (the merge's saved input), plus one block's q, k, v and the
    # ∂q, ∂v its kernel backward writes
    assert len(alive(train, 'torch.bfloat16')) <= depth + 5, len(alive(train, 'torch.bfloat16'))
    assert len(alive(kept, 'torch.bfloat16')) >= 3 * (depth - 1), len(alive(kept, 'torch.bfloat16'))
    # the depthwise conv's output is recomputed in the backward (scan_qkv.conv_scan_qkv), not saved per block: at
    # most the one being recomputed is alive
    conv_out = [t for t in train['at_peak'] if t['op'] == 'aten.convolution.default' and t['shape'][1] == 3 * H * D]
    assert len(conv_out) <= 1, conv_out


def test_grouping_sums_same_shaped_tensors():
    from live_bytes import grouped
    mib = 2 ** 20
    at_peak = [(3 * mib, ('aten.mm', (4, 8), 'bf16')), (2 * mib, ('aten.mm', (4, 8), 'bf16')),
               (4 * mib, ('aten.add', (2,), 'fp32'))]
    rows = grouped(at_peak)
    assert [(r['op'], r['count'], r['mib']) for r in rows] == [('aten.mm', 2, 5.0), ('aten.add', 1, 4.0)]


def test_compiled_training_is_one_graph_with_the_core_op(tmp_path):
    """--mode compiled-train: with the CUDA code path (fused glue) torch.compile makes one graph of gka_tiny by
    default (each mixer's core one op) and counts what it keeps for the backward; with GKA_COMPILE_CORE=0 the glue
    kernels are graph breaks (several graphs)."""
    one = _emulate(tmp_path, '--size', '32', '--mode', 'compiled-train')
    broken = _emulate(tmp_path, '--size', '32', '--mode', 'compiled-train', GKA_COMPILE_CORE='0')
    assert one['graphs'] == 1 and broken['graphs'] > 1, (one, broken)
    assert one['saved_bytes'] > 0
