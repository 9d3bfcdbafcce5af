"""Every malformed input raises a GKAInputError that names the argument."""
import pytest
import torch

from gka_inputs import make_inputs
from gka_kernels import GKAInputError, gka_chunk, gka_step


def _x(dtype=torch.float32):
    return make_inputs(1, 5, 2, 8, dtype=dtype)


def _replace(x, i, t):
    x = list(x)
    x[i] = t
    return x


CHUNK_CASES = [
    ('q must have rank 4', lambda x: _replace(x, 0, x[0][0]), {}),
    ('g must have rank 3', lambda x: _replace(x, 3, x[3][..., None]), {}),
    ('leading dims', lambda x: _replace(x, 1, x[1][:, :4]), {}),
    ('same head dim', lambda x: _replace(x, 1, torch.randn(1, 5, 2, 4)), {}),
    ('g .*shape', lambda x: _replace(x, 3, -torch.rand(1, 5, 3)), {}),
    ('alpha .*shape', lambda x: _replace(x, 4, torch.rand(1, 4, 2)), {}),
    ('q must be float16', lambda x: _replace(x, 0, x[0].to(torch.int32)), {}),
    ('one dtype', lambda x: _replace(x, 2, x[2].double()), {}),
    ('g \\(log-decay\\) must be float32', lambda x: _replace(x, 3, x[3].bfloat16()), {}),
    ('g must be <= 0', lambda x: _replace(x, 3, x[3].abs() + 0.1), {}),
    ('k is on meta', lambda x: _replace(x, 1, x[1].to('meta')), {}),
    ('num_iter', lambda x: x, dict(num_iter=-1)),
    ('num_iter', lambda x: x, dict(num_iter=2.0)),
    ('num_iter', lambda x: x, dict(num_iter=True)),
    ('ridge_ratio', lambda x: x, dict(ridge_ratio=0.0)),
    ('ridge_ratio', lambda x: x, dict(ridge_ratio=float('nan'))),
    ('scale', lambda x: x, dict(scale=-1.0)),
    ('chunk_size', lambda x: x, dict(chunk_size=0)),
    ('backend must be one of', lambda x: x, dict(backend='cuda')),
    ('needs CUDA tensors', lambda x: x, dict(backend='triton')),
    ('initial_state must be a pair', lambda x: x, dict(initial_state=torch.zeros(1, 2, 8, 8))),
    ('initial_state.h_kk must have shape', lambda x: x,
     dict(initial_state=(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 8)))),
    ('initial_state.h_kv must be a torch.Tensor', lambda x: x, dict(initial_state=(torch.zeros(1, 2, 8, 8), None))),
]


@pytest.mark.parametrize('match,mutate,kwargs', CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_gka_chunk_rejects(match, mutate, kwargs, monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(GKAInputError, match=match):
        gka_chunk(*mutate(_x()), **kwargs)


def test_non_tensor_input():
    x = _x()
    with pytest.raises(GKAInputError, match='q must be a torch.Tensor'):
        gka_chunk(x[0].tolist(), *x[1:])


def test_env_backend_override(monkeypatch):
    x = _x()
    monkeypatch.setenv('GKA_BACKEND', 'bogus')
    with pytest.raises(GKAInputError, match='GKA_BACKEND must be one of'):
        gka_chunk(*x)
    monkeypatch.setenv('GKA_BACKEND', 'naive')
    torch.testing.assert_close(gka_chunk(*x), gka_chunk(*x, backend='naive'), rtol=0, atol=0)
    explicit = gka_chunk(*x, backend='torch')
    monkeypatch.setenv('GKA_BACKEND', 'torch')
    via_env = gka_chunk(*x)
    # an explicit argument wins over the environment; the two backends differ in the last fp32 bits
    assert torch.equal(explicit, via_env) and not torch.equal(via_env, gka_chunk(*x, backend='naive'))


def test_value_check_can_be_disabled(monkeypatch):
    x = _x()
    monkeypatch.setenv('GKA_CHECK_VALUES', '0')
    gka_chunk(*_replace(x, 3, x[3].abs()))  # no sync, no error: the caller vouches for the sign
    with pytest.raises(GKAInputError, match='g must be <= 0'):   # the argument wins over the environment
        gka_chunk(*_replace(x, 3, x[3].abs()), check_values=True)
    monkeypatch.delenv('GKA_CHECK_VALUES')
    gka_chunk(*_replace(x, 3, x[3].abs()), check_values=False)
    step = [t[:, 0] for t in _replace(x, 3, x[3].abs())]
    gka_step(*step, check_values=False)
    with pytest.raises(GKAInputError, match='g must be <= 0'):
        gka_step(*step)


STEP_CASES = [
    ('q must have rank 3', lambda x: _replace(x, 0, x[0][None, None])),
    ('takes one token', lambda x: [t[:, None].expand(-1, 2, *t.shape[1:]) for t in x]),
    ('g .*shape', lambda x: _replace(x, 3, -torch.rand(1, 3))),
    ('g must be <= 0', lambda x: _replace(x, 3, torch.rand(1, 2) + 0.5)),
]


@pytest.mark.parametrize('match,mutate', STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_gka_step_rejects(match, mutate):
    x = [t[:, 0] for t in _x()]
    with pytest.raises(GKAInputError, match=match):
        gka_step(*mutate(x))


def test_gka_step_rejects_bad_state():
    x = [t[:, 0] for t in _x()]
    with pytest.raises(GKAInputError, match='state.h_kk must have shape'):
        gka_step(*x, (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8)))
    with pytest.raises(GKAInputError, match='state.h_kv is on meta'):
        gka_step(*x, (torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8, device='meta')))


def test_default_triton_falls_back_to_torch_for_unsupported_inputs(monkeypatch):
    """On CUDA the default is triton; inputs its kernels are not compiled for (fp64, head dim 16) go to the torch
    backend instead of failing, while an explicit backend='triton' still raises."""
    import gka_kernels.api as api
    monkeypatch.setattr(api, 'resolve_backend', lambda backend, device: backend or 'triton')
    monkeypatch.delenv('GKA_BACKEND', raising=False)
    q64, _, v64, _, _ = make_inputs(1, 5, 2, 64)
    q16, _, v16, _, _ = make_inputs(1, 5, 2, 16, dtype=torch.float32)
    q32, _, v32, _, _ = make_inputs(1, 5, 2, 32, dtype=torch.float32)
    assert api._pick_backend(None, q64, v64) == 'torch'
    assert api._pick_backend(None, q16, v16) == 'torch'
    assert api._pick_backend(None, q32, v32) == 'triton'
    assert api._pick_backend('triton', q16, v16) == 'triton'  # the kernel's own check then raises
    from gka_kernels.triton.config import check_triton_inputs
    with pytest.raises(GKAInputError, match='head dims'):
        check_triton_inputs(q16, v16)


def test_triton_tuning_knobs(monkeypatch):
    """The Triton backend's benchmark knobs: defaults per dtype and a clear error for a bad value (host-side code,
    importable without a GPU)."""
    pytest.importorskip('triton', reason='the knobs belong to the Triton backend, which needs triton installed')
    from gka_kernels.triton.config import backward_chunk_size, backward_state_chunk, pick_chunk_size, solve_dot_mode
    from gka_kernels.triton.solve import acc_precision, solve_schedule
    assert acc_precision(torch.bfloat16) == 'bf16x3'
    assert acc_precision(torch.float16) == 'tf32x3'
    assert acc_precision(torch.float32) == 'ieee'
    monkeypatch.setenv('GKA_TRITON_ACC', 'bf16x3')
    assert acc_precision(torch.float16) == 'tf32x3'   # fp16 tiles are not exact in bf16
    monkeypatch.setenv('GKA_TRITON_ACC', 'fp8')
    with pytest.raises(ValueError, match='GKA_TRITON_ACC'):
        acc_precision(torch.bfloat16)
    assert backward_chunk_size(32) == 16 and backward_chunk_size(16) == 16
    assert backward_state_chunk(64) == 32 and backward_state_chunk(32) == 32 and backward_state_chunk(16) == 16
    # h16x2 only where it was timed faster: bf16 at D = 64
    assert solve_dot_mode(torch.bfloat16, 64) == 'h16x2'
    assert solve_dot_mode(torch.bfloat16, 128) == solve_dot_mode(torch.bfloat16, 32) == 'bf16x3'
    assert solve_dot_mode(torch.float16, 64) == 'bf16x3' and solve_dot_mode(torch.float32, 64) == 'ieee'
    # 64-token chunks only where they were measured faster: bf16, D = 64, longer than one 32-token chunk
    assert pick_chunk_size(None, 64, 196, torch.bfloat16) == 64
    assert pick_chunk_size(None, 64, 32, torch.bfloat16) == 32
    assert pick_chunk_size(None, 128, 4096, torch.bfloat16) == 32
    assert pick_chunk_size(None, 32, 300, torch.bfloat16) == 32
    assert pick_chunk_size(None, 64, 4096, torch.float16) == 32 and pick_chunk_size(None, 64, 4096, torch.float32) == 32
    assert pick_chunk_size(16, 64, 4096, torch.bfloat16) == 16
    monkeypatch.setenv('GKA_TRITON_BWD_CHUNK', '32')
    assert backward_chunk_size(32) == 32
    monkeypatch.setenv('GKA_TRITON_BWD_CHUNK', '48')
    with pytest.raises(GKAInputError, match='GKA_TRITON_BWD_CHUNK'):
        backward_chunk_size(32)
    monkeypatch.setenv('GKA_TRITON_BWD_STATE_CHUNK', '16')
    assert backward_state_chunk(64) == 16
    monkeypatch.setenv('GKA_TRITON_BWD_STATE_CHUNK', '128')
    with pytest.raises(GKAInputError, match='GKA_TRITON_BWD_STATE_CHUNK'):
        backward_state_chunk(64)
    monkeypatch.setenv('GKA_TRITON_DOT', 'bf16x3')
    assert solve_dot_mode(torch.bfloat16, 64) == 'bf16x3'
    monkeypatch.setenv('GKA_TRITON_CHUNK', '8')
    with pytest.raises(GKAInputError, match='GKA_TRITON_CHUNK'):
        pick_chunk_size(None, 64)
    from gka_kernels.triton.solve import FAST_TOL, FAST_TOL_BF16, FAST_TOL_R, FAST_UNIT, dot_mode, fast_steps
    # the split modes run their leading steps single-pass in fp16 (MODE 8), as many as the damping allows; bf16
    # inputs (modes 5, 6) have the larger tolerance: their output's own rounding absorbs more
    n, n16 = fast_steps(30, 0.02, FAST_TOL_BF16), fast_steps(30, 0.02)
    assert solve_schedule(5, 30, 0.02) == dict(FAST=n, FAST_MODE=8, ILP=True, TRANS=False) and 15 <= n <= 19
    assert solve_schedule(4, 30, 0.02)['FAST'] == n16 and 10 <= n16 <= 15 and n16 < n
    assert solve_schedule(6, 30, 0.02)['FAST'] == n and solve_schedule(7, 30, 0.02)['FAST'] == n16
    assert solve_schedule(0, 30, 0.02)['FAST'] == 0   # fp32: exact
    assert solve_schedule(5, 30, 5e-4) == dict(FAST=0, FAST_MODE=2, ILP=True, TRANS=False)      # fp16 range
    assert dot_mode('h16x2', torch.bfloat16, 0.02) == 6 and dot_mode('h16x2', torch.float16, 0.02) == 7
    assert dot_mode('h16x2', torch.bfloat16, 1e-4) == 5   # fp16 rows need r ≥ 1e-3: the default split instead
    assert dot_mode('bf16x3', torch.bfloat16) == 5 and dot_mode('bf16x3', torch.float16) == 4
    monkeypatch.setenv('GKA_TRITON_FAST_ITERS', '15')   # h16x2's leading steps: single-pass fp16 (MODE 8)
    assert solve_schedule(6, 30, 0.02)['FAST'] == 15 and solve_schedule(6, 30, 0.02)['FAST_MODE'] == 8
    assert solve_schedule(7, 30, 0.02)['FAST_MODE'] == 8
    monkeypatch.setenv('GKA_TRITON_FAST_ITERS', '40')
    assert solve_schedule(5, 30, 0.02)['FAST'] == 30 and solve_schedule(0, 30, 0.02)['FAST'] == 0
    monkeypatch.setenv('GKA_TRITON_FAST_ITERS', '0')
    assert solve_schedule(5, 30, 0.02) == dict(FAST=0, FAST_MODE=2, ILP=True, TRANS=False)
    monkeypatch.delenv('GKA_TRITON_FAST_ITERS')
    monkeypatch.setenv('GKA_TRITON_FAST_DOT', 'lowp')   # single-pass bf16 / tf32 steps, only when asked for
    assert solve_schedule(5, 30, 0.02)['FAST'] == 0
    monkeypatch.setenv('GKA_TRITON_FAST_ITERS', '10')
    assert solve_schedule(5, 30, 0.02)['FAST_MODE'] == 2 and solve_schedule(4, 30, 0.02)['FAST_MODE'] == 1
    monkeypatch.setenv('GKA_TRITON_FAST_DOT', 'fp8')
    with pytest.raises(ValueError, match='GKA_TRITON_FAST_DOT'):
        solve_schedule(5, 30, 0.02)
    monkeypatch.delenv('GKA_TRITON_FAST_DOT')
    monkeypatch.delenv('GKA_TRITON_FAST_ITERS')
    monkeypatch.setenv('GKA_TRITON_SOLVE_T', '1')   # MODE 8 has rows only: the transposed solve runs no fast steps
    assert solve_schedule(5, 30, 0.02)['FAST'] == 0 and solve_schedule(5, 30, 0.02)['TRANS']
    monkeypatch.delenv('GKA_TRITON_SOLVE_T')
    # the rule: the longest prefix whose rounding, damped by the steps after it, stays within FAST_TOL, scaled by
    # (r / FAST_TOL_R)² below FAST_TOL_R (∂k's sensitivity to early rounding grows as the ridge shrinks)
    from gka_kernels.chebyshev import error_gains
    for N, r in ((30, 0.02), (20, 0.02), (30, 0.05), (50, 0.01), (30, 0.01), (30, 0.015), (20, 0.1)):
        for base in (FAST_TOL, FAST_TOL_BF16):
            n, gains = fast_steps(N, r, base), error_gains(N, r)
            tol = base * min(1.0, (r / FAST_TOL_R) ** 2)
            assert FAST_UNIT * sum(gains[:n]) <= tol < FAST_UNIT * sum(gains[:n + 1]), (N, r, n)
    # more fast steps with more iterations after them or a larger ridge (faster contraction); none where the
    # iteration barely contracts, nor at r = 0.005 where one fp16 step took ∂k past its bf16 bound on the H200
    assert fast_steps(20, 0.02) < fast_steps(30, 0.02) < fast_steps(30, 0.05) < fast_steps(30, 0.1)
    assert fast_steps(30, 0.01) < fast_steps(30, 0.015) < fast_steps(30, 0.02)
    assert fast_steps(20, 0.005) == 0 and fast_steps(30, 0.005) == 0 and fast_steps(1, 0.5) == 0
    assert fast_steps(30, 0.005, FAST_TOL_BF16) == 0 and solve_schedule(5, 30, 0.005)['FAST'] == 0


def test_error_gains_match_a_perturbed_solve():
    """chebyshev.error_gains against the solve itself: perturb the iterate after step k of chebyshev_solve on a
    diagonal system spanning the spectrum [r f, (1 + r) f] (float64) and measure how much of it reaches x_N."""
    from gka_kernels.chebyshev import chebyshev_omegas, chebyshev_solve, error_gains, step_size
    for N, r in ((30, 0.02), (12, 0.005), (20, 0.1)):
        f = 3.7
        mu = torch.linspace(r, 1.0 + r, 257, dtype=torch.float64) * f
        rhs = torch.randn(257, dtype=torch.float64)
        eta = step_size(torch.tensor(f, dtype=torch.float64), r)
        omegas = chebyshev_omegas(N, r)
        base = chebyshev_solve(lambda x: mu * x, rhs, eta, omegas)
        for k in range(N):
            calls = []

            def matvec(x, k=k):
                # step k computes x_{k+1} = ω_k (x_k − η (A x_k − b)) + …: adding d to A x_k moves x_{k+1} by −ω_k η d
                calls.append(None)
                return mu * x + (1e-3 if len(calls) == k + 1 else 0.0)
            moved = (chebyshev_solve(matvec, rhs, eta, omegas) - base) / (-omegas[k] * eta * 1e-3)
            expected = error_gains(N, r, grid=257)[k]
            assert abs(moved.abs().max().item() - expected) <= 1e-6 * max(1.0, expected), (N, r, k)


def test_triton_forward_pieces(monkeypatch):
    """The forward's launches: segments at the chosen chunk size, then a ragged last chunk at the smallest chunk size
    that holds it (never when that is the chosen size already); GKA_TRITON_TAIL=0 pads it instead."""
    pytest.importorskip('triton', reason='the launch plan belongs to the Triton backend')
    from gka_kernels.triton.config import forward_pieces
    monkeypatch.setenv('GKA_TRITON_TAIL', '0')
    assert forward_pieces(196, 4096, 64) == [(0, 196, 64)]
    assert forward_pieces(300, 128, 64) == [(0, 128, 64), (128, 256, 64), (256, 300, 64)]
    monkeypatch.delenv('GKA_TRITON_TAIL')
    assert forward_pieces(196, 4096, 64) == [(0, 192, 64), (192, 196, 16)]
    assert forward_pieces(300, 128, 64) == [(0, 128, 64), (128, 256, 64), (256, 300, 64)]   # a 44-token tail
    assert forward_pieces(77, 4096, 32) == [(0, 64, 32), (64, 77, 16)]
    assert forward_pieces(256, 4096, 64) == [(0, 256, 64)] and forward_pieces(20, 4096, 64) == [(0, 20, 64)]


def test_triton_segment_length(monkeypatch):
    pytest.importorskip('triton', reason='the segment policy belongs to the Triton backend')
    from gka_kernels.triton.config import segment_length
    # gka_small at 1024 px, 16 images: ~64 MB of states would be 640 tokens; the 4,096-program floor gives 1,376
    S = segment_length(16, 6, 64, 64, 4096, 32)
    assert S == -(-4096 // (16 * 6)) * 32 == 1376
    # at D = 32 the cap decides: 64 MB / (2·4·32·64·4 B) = 1,024 chunks, above the floor's 512
    assert segment_length(2, 4, 32, 32, 65536, 32) == 1024 * 32
    assert segment_length(256, 6, 64, 64, 196, 32) >= 64   # ≥ 4,096 (chunk, head) programs per launch
    assert segment_length(1, 6, 64, 64, 65536, 32) >= 4096 * 32 // 6
    monkeypatch.setenv('GKA_TRITON_SEGMENT', '0')
    assert segment_length(16, 6, 64, 64, 4096, 32) == 4096
    monkeypatch.setenv('GKA_TRITON_SEGMENT', '100')
    assert segment_length(16, 6, 64, 64, 4096, 32) == 128
    monkeypatch.delenv('GKA_TRITON_SEGMENT')
    monkeypatch.setenv('GKA_TRITON_STATE_MB', '256')      # a higher cap: longer segments
    assert 2048 <= segment_length(16, 6, 64, 64, 4096, 32) < 4096
    monkeypatch.setenv('GKA_TRITON_STATE_MB', '16')       # a lower one: down to the program floor
    assert segment_length(16, 6, 64, 64, 4096, 32) == S
    assert segment_length(256, 6, 64, 64, 196, 32) >= 64  # the program floor still holds
    monkeypatch.setenv('GKA_TRITON_MIN_PROGRAMS', '1024')   # a lower floor: 11 chunks of 32 (the 16 MB cap: 5)
    assert segment_length(16, 6, 64, 64, 4096, 32) == 11 * 32
    monkeypatch.setenv('GKA_TRITON_STATE_MB', '64')         # 64 MB: 21 chunks, now above the floor
    assert segment_length(16, 6, 64, 64, 4096, 32) == (64 << 20) // (16 * 6 * 64 * 128 * 4) * 32 == 672
    monkeypatch.setenv('GKA_TRITON_MIN_PROGRAMS', '0')
    with pytest.raises(GKAInputError, match='GKA_TRITON_MIN_PROGRAMS'):
        segment_length(16, 6, 64, 64, 4096, 32)
    monkeypatch.delenv('GKA_TRITON_MIN_PROGRAMS')
    monkeypatch.setenv('GKA_TRITON_STATE_MB', '0')
    with pytest.raises(GKAInputError, match='GKA_TRITON_STATE_MB'):
        segment_length(16, 6, 64, 64, 4096, 32)


def test_torch_backend_default_chunk():
    """The torch backend's default chunk (kernels/api.py): 16 without autograd or at D ≤ 32, 32 when a D = 64
    backward will follow (measured on a 2-core CPU); an explicit chunk_size always wins."""
    from gka_kernels.api import _torch_chunk_size
    q64, q32 = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 32)
    leaf = torch.randn(1, 8, 1, 64, requires_grad=True)
    assert _torch_chunk_size(q64, (q64,)) == 16 and _torch_chunk_size(q32, (q32, leaf)) == 16
    assert _torch_chunk_size(q64, (q64, leaf)) == 32
    with torch.no_grad():
        assert _torch_chunk_size(q64, (q64, leaf)) == 16
