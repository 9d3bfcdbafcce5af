"""Forward of the torch (chunked) backend against the float64 token-by-token recurrence."""
from functools import lru_cache

import pytest
import torch

from gka_inputs import make_inputs, rel_rmse
from gka_kernels import gka_chunk
from gka_kernels.reference import gka_naive


@lru_cache(maxsize=None)
def _case(T, D):
    x = make_inputs(2, T, 3, D)
    o, state = gka_naive(*x, num_iter=30, output_final_state=True)
    return x, o, state


@pytest.mark.parametrize('T', [1, 7, 64, 197, 300])
@pytest.mark.parametrize('D', [16, 64])
@pytest.mark.parametrize('chunk_size', [16, 32, 64])
def test_torch_matches_naive(T, D, chunk_size):
    x, o_ref, (h_ref, u_ref) = _case(T, D)
    o, (h, u) = gka_chunk(*x, chunk_size=chunk_size, output_final_state=True, backend='torch')
    assert o.dtype == torch.float64 and o.shape == o_ref.shape
    assert rel_rmse(o, o_ref) <= 1e-10
    assert rel_rmse(h, h_ref) <= 1e-10
    assert rel_rmse(u, u_ref) <= 1e-10


def test_naive_backend_through_api_matches_reference():
    x = make_inputs(1, 20, 2, 8)
    assert rel_rmse(gka_chunk(*x, backend='naive'), gka_naive(*x)) == 0.0


def test_converged_solve_matches_exact_solve():
    x = make_inputs(2, 90, 2, 16)
    o_exact = gka_naive(*x, exact_solve=True)
    o = gka_chunk(*x, num_iter=200, chunk_size=32, backend='torch')
    assert rel_rmse(o, o_exact) <= 1e-10


def _gla_quadratic(q, k, v, g, scale):
    """Plain gated linear attention written as a masked, decayed attention matrix (an independent oracle)."""
    G = g.cumsum(1)                                              # [B, T, H]
    diff = G[:, :, None, :] - G[:, None, :, :]                   # [B, t, i, H]
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    w = torch.where(causal, diff, torch.full_like(diff, float('-inf'))).exp()
    scores = torch.einsum('bthd,bihd->btih', q, k) * w
    return scale * torch.einsum('btih,bihd->bthd', scores, v)


@pytest.mark.parametrize('T', [5, 70])
def test_num_iter_zero_is_gated_linear_attention(T):
    q, k, v, g, alpha = make_inputs(2, T, 2, 8)
    o = gka_chunk(q, k, v, g, alpha, num_iter=0, chunk_size=16, backend='torch')
    assert rel_rmse(o, _gla_quadratic(q, k, v, g, 8 ** -0.5)) <= 1e-12
    # alpha is unused without the solve
    o2 = gka_chunk(q, k, v, g, torch.rand_like(alpha), num_iter=0, chunk_size=16, backend='torch')
    assert torch.equal(o, o2)


def test_result_does_not_depend_on_chunk_size_or_scale_default():
    x = make_inputs(1, 77, 2, 16)
    a = gka_chunk(*x, chunk_size=8, backend='torch')
    b = gka_chunk(*x, chunk_size=64, scale=16 ** -0.5, backend='torch')
    assert rel_rmse(a, b) <= 1e-12


def test_different_value_head_dim():
    x = make_inputs(2, 33, 2, 8, Dv=12)
    o_ref, (h_ref, u_ref) = gka_naive(*x, output_final_state=True)
    o, (h, u) = gka_chunk(*x, chunk_size=16, output_final_state=True, backend='torch')
    assert o.shape == (2, 33, 2, 12) and u.shape == (2, 2, 8, 12)
    assert rel_rmse(o, o_ref) <= 1e-10 and rel_rmse(u, u_ref) <= 1e-10


def test_initial_state_chaining():
    x = make_inputs(2, 150, 2, 16)
    o_full, s_full = gka_chunk(*x, chunk_size=32, output_final_state=True, backend='torch')
    first = [t[:, :61] for t in x]
    second = [t[:, 61:] for t in x]
    o1, s1 = gka_chunk(*first, chunk_size=32, output_final_state=True, backend='torch')
    o2, s2 = gka_chunk(*second, chunk_size=32, initial_state=s1, output_final_state=True, backend='torch')
    assert rel_rmse(torch.cat([o1, o2], 1), o_full) <= 1e-12
    assert rel_rmse(s2[0], s_full[0]) <= 1e-12 and rel_rmse(s2[1], s_full[1]) <= 1e-12
    # the naive backend chains the same way
    n1, ns1 = gka_naive(*first, output_final_state=True)
    n2 = gka_naive(*second, initial_state=ns1)
    assert rel_rmse(torch.cat([n1, n2], 1), o_full) <= 1e-10


def test_final_state_is_fp32_for_low_precision_inputs():
    x = make_inputs(1, 10, 2, 16, dtype=torch.float32)
    o, (h, u) = gka_chunk(*x, output_final_state=True, backend='torch')
    assert o.dtype == torch.float32 and h.dtype == torch.float32 and u.dtype == torch.float32
    x = make_inputs(1, 10, 2, 16, dtype=torch.bfloat16)
    o, (h, u) = gka_chunk(*x, output_final_state=True, backend='torch')
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x64 = make_inputs(2, 197, 3, 64)
    ref = gka_naive(*x64)
    xh = [t.to(dtype) if t.dtype == torch.float64 and i != 3 else t.float() for i, t in enumerate(x64)]
    o = gka_chunk(*xh, backend='torch')
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert rel_rmse(o, ref) <= 2e-2


@pytest.mark.parametrize('backend', ['torch', 'naive'])
def test_zero_gram_gives_no_nan(backend):
    """All-zero keys (f = 0) and zero keys at the start of a sequence: finite outputs and gradients."""
    q, k, v, g, alpha = make_inputs(1, 40, 2, 8, dtype=torch.float32)
    k_zero = torch.zeros_like(k)
    k_lead = k.clone()
    k_lead[:, :10] = 0
    for keys in (k_zero, k_lead):
        leaves = [t.clone().requires_grad_() for t in (q, keys, v, g, alpha)]
        o = gka_chunk(*leaves, chunk_size=16, backend=backend)
        assert torch.isfinite(o).all()
        o.square().sum().backward()
        for t in leaves:
            assert torch.isfinite(t.grad).all()
    o = gka_chunk(q, k_zero, v, g, alpha, backend=backend)
    assert torch.count_nonzero(o) == 0


@pytest.mark.parametrize('backend', ['torch', 'naive'])
def test_empty_sequence_passes_the_state_through(backend):
    x = make_inputs(1, 0, 2, 8)
    h0 = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    u0 = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    o, (h, u) = gka_chunk(*x, initial_state=(h0, u0), output_final_state=True, backend=backend)
    assert o.shape == (1, 0, 2, 8) and torch.equal(h, h0) and torch.equal(u, u0)


def test_autocast_does_not_reach_inside_the_operator():
    """A bf16 autocast region around the caller must not turn the backend's fp32 matmuls into bf16 ones: the solve
    would amplify their rounding (forward and backward)."""
    x64 = make_inputs(2, 100, 3, 32, requires_grad=True)
    ref = gka_naive(*x64)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(gka_chunk(*x64, backend='torch'), x64, do)
    x32 = [t.detach().float().requires_grad_() for t in x64]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        o = gka_chunk(*x32, backend='torch')
        assert o.dtype == torch.float32
        grads = torch.autograd.grad(o, x32, do.float())
    assert rel_rmse(o, ref) <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_rmse(a, b) <= 1e-4
