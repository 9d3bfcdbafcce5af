"""One-token decoding: prefill with gka_chunk, then gka_step, reproduces the whole-sequence output."""
import pytest
import torch

from gka_inputs import make_inputs, rel_rmse
from gka_kernels import gka_chunk, gka_step


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('split', [0, 1, 37, 64])
def test_prefill_then_step_matches_chunk(dtype, tol, split):
    x = make_inputs(2, 80, 3, 16, dtype=dtype)
    o_full, s_full = gka_chunk(*x, chunk_size=32, output_final_state=True, backend='torch')
    outs, state = [], None
    if split:
        o_pre, state = gka_chunk(*[t[:, :split] for t in x], chunk_size=32, output_final_state=True,
                                 backend='torch')
        outs.append(o_pre)
    for t in range(split, 80):
        o, state = gka_step(*[a[:, t] for a in x], state, backend='torch')
        outs.append(o[:, None])
    assert rel_rmse(torch.cat(outs, 1), o_full) <= tol
    assert rel_rmse(state[0], s_full[0]) <= tol and rel_rmse(state[1], s_full[1]) <= tol


def test_step_accepts_sequence_layout_and_zero_start():
    q, k, v, g, alpha = make_inputs(2, 1, 2, 8)
    o_chunk = gka_chunk(q, k, v, g, alpha, backend='torch')
    o, (h, u) = gka_step(q, k, v, g, alpha, backend='torch')
    assert o.shape == (2, 1, 2, 8) and h.shape == (2, 2, 8, 8)
    assert rel_rmse(o, o_chunk) <= 1e-12


def test_step_state_dtype_and_num_iter_zero():
    q, k, v, g, alpha = make_inputs(1, 3, 2, 8, dtype=torch.bfloat16)
    o, (h, u) = gka_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], alpha[:, 0], num_iter=0, backend='torch')
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32 and u.dtype == torch.float32
    # with N = 0 the Gram is still tracked, so a later step with N > 0 sees the whole past
    o_full = gka_chunk(q, k, v, g, alpha, num_iter=0, backend='torch')
    state = None
    for t in range(3):
        o, state = gka_step(q[:, t], k[:, t], v[:, t], g[:, t], alpha[:, t], state, num_iter=0, backend='torch')
    assert rel_rmse(o, o_full[:, -1]) <= 1e-2
    _, s_chunk = gka_chunk(q, k, v, g, alpha, num_iter=0, output_final_state=True, backend='torch')
    assert rel_rmse(state[0], s_chunk[0]) <= 1e-6
