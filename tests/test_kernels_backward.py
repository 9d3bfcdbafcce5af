"""Gradients of the torch backend: implicit (adjoint-solve) gradients checked against float64 oracles."""
import pytest
import torch

from gka_inputs import make_inputs, rel_rmse
from gka_kernels import gka_chunk
from gka_kernels.reference import gka_naive, gka_naive_implicit_grads

NAMES = ('q', 'k', 'v', 'g', 'alpha')


def _random_state(B, H, D, Dv):
    k = torch.randn(B, H, 6, D, dtype=torch.float64) * 0.4
    return k.transpose(-1, -2) @ k, torch.randn(B, H, D, Dv, dtype=torch.float64) * 0.3


@pytest.mark.parametrize('T,chunk_size', [(45, 16), (64, 32), (130, 64)])
def test_converged_grads_equal_autograd_through_exact_solve(T, chunk_size):
    x = make_inputs(2, T, 2, 8, requires_grad=True)
    h0, u0 = (t.requires_grad_() for t in _random_state(2, 2, 8, 8))
    o = gka_chunk(*x, num_iter=200, chunk_size=chunk_size, initial_state=(h0, u0), backend='torch')
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [*x, h0, u0], do)
    y = [t.detach().clone().requires_grad_() for t in (*x, h0, u0)]
    o_ref = gka_naive(*y[:5], initial_state=(y[5], y[6]), exact_solve=True)
    ref = torch.autograd.grad(o_ref, y, do)
    for name, a, b in zip(NAMES + ('h_kk', 'h_kv'), grads, ref):
        assert rel_rmse(a, b) <= 1e-9, name


@pytest.mark.parametrize('num_iter', [30, 10, 0])
def test_grads_equal_implicit_formulas(num_iter):
    """At an unconverged N the gradients are the §5.2 formulas evaluated at the computed x and u, including the
    gradients of a returned final state and of the initial state."""
    x = make_inputs(2, 83, 3, 16, Dv=8, requires_grad=True)
    h0, u0 = (t.requires_grad_() for t in _random_state(2, 3, 16, 8))
    o, (hT, uT) = gka_chunk(*x, num_iter=num_iter, chunk_size=32, initial_state=(h0, u0),
                            output_final_state=True, backend='torch')
    do, dH, dU = torch.randn_like(o), torch.randn_like(hT), torch.randn_like(uT)
    grads = torch.autograd.grad([o, hT, uT], [*x, h0, u0], [do, dH, dU])
    ref = gka_naive_implicit_grads(*[t.detach() for t in x], do, num_iter=num_iter,
                                   initial_state=(h0.detach(), u0.detach()), d_final_state=(dH, dU))
    for name, a in zip(NAMES + ('h_kk', 'h_kv'), grads):
        if name == 'alpha' and num_iter == 0:
            assert torch.count_nonzero(a) == 0
            continue
        assert rel_rmse(a, ref[name]) <= 1e-10, name


def test_implicit_oracle_equals_exact_gradient_when_converged():
    """The oracle itself: at a converged N the §5.2 formulas are the true gradient of the exact-solve layer."""
    x = make_inputs(1, 30, 2, 8, requires_grad=True)
    o = gka_naive(*x, exact_solve=True)
    do = torch.randn_like(o)
    ref = torch.autograd.grad(o, x, do)
    imp = gka_naive_implicit_grads(*[t.detach() for t in x], do, num_iter=150)
    for name, a in zip(NAMES, ref):
        assert rel_rmse(imp[name], a) <= 1e-9, name


def test_unconverged_implicit_gradient_differs_from_unrolled():
    """Sanity check that the test above is not vacuous: at N = 5 the implicit gradient is not the gradient of
    the computed forward (which autograd through the unrolled naive iterations gives) for the keys. For q the two
    coincide: x = p_N(A)q with a symmetric polynomial p_N(A), whose adjoint is the same N-step solve."""
    x = make_inputs(1, 30, 2, 8, requires_grad=True)
    o = gka_naive(*x, num_iter=5)
    do = torch.randn_like(o)
    unrolled = torch.autograd.grad(o, x[:2], do)
    imp = gka_naive_implicit_grads(*[t.detach() for t in x], do, num_iter=5)
    assert rel_rmse(imp['q'], unrolled[0]) <= 1e-12
    assert rel_rmse(imp['k'], unrolled[1]) > 1e-3


def test_gradcheck_torch_backend():
    """Finite differences of the forward equal the implicit gradient once the solve has converged (N = 120 at
    these tiny shapes); with N = 0 there is no solve and the gradient is exact at any length."""
    torch.manual_seed(1)
    x = make_inputs(1, 6, 1, 3, Dv=2, requires_grad=True)
    h0, u0 = (t.requires_grad_() for t in _random_state(1, 1, 3, 2))

    def fn(q, k, v, g, alpha, h0, u0, n):
        o, (h, u) = gka_chunk(q, k, v, g, alpha, num_iter=n, chunk_size=4, initial_state=(h0, u0),
                              output_final_state=True, backend='torch')
        return o, h, u

    assert torch.autograd.gradcheck(lambda *a: fn(*a, 120), (*x, h0, u0), atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, 0), (*x, h0, u0), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize('exact', [True, False])
def test_gradcheck_naive_reference(exact):
    x = make_inputs(1, 5, 1, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gka_naive(*a, num_iter=12, exact_solve=exact), x)


def test_fp32_grads_close_to_float64():
    x64 = make_inputs(2, 100, 2, 32, requires_grad=True)
    o = gka_chunk(*x64, backend='torch')
    do = torch.randn_like(o)
    ref = torch.autograd.grad(o, x64, do)
    x32 = [t.detach().float().requires_grad_() for t in x64]
    got = torch.autograd.grad(gka_chunk(*x32, backend='torch'), x32, do.float())
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rmse(a, b) <= 1e-4, name
