"""Tensor-core products of the kernels, in the precisions the kernels need (one place for every split).

Two kinds of product:
    * ``_mm`` / ``_mm_t``: the products inside the Chebyshev loop, whose constant operands (H⁰, the keys) are cast
      once before the loop (``_op``, ``_lo``), on the right or (transposed solve) on the left;
    * ``_xdot``: the fixed products (norms, readout, gradients, state passes), with compile-time flags saying
      which operands hold values that are exact in bf16 (tiles loaded from bf16 inputs). In 'bf16x3' an exact
      operand is not split, so a product of two loaded tiles is one bf16 MMA, one exact side makes it two and
      none three: ~16 mantissa bits per operand at bf16 tensor-core speed, against tf32x3's three tf32 MMAs.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _op(a, MODE: tl.constexpr):
    """A dot operand in the precision of MODE (cast once, outside the iteration loop)."""
    if MODE == 2:
        out = a.to(tl.bfloat16)
    elif MODE == 3:
        out = a.to(tl.float16)
    elif MODE == 5:
        out = a.to(tl.bfloat16)
    else:
        out = a
    return out


@triton.jit
def _lo(a, MODE: tl.constexpr):
    """The rounding remainder a − bf16(a), itself in bf16 (MODE 5 only; a placeholder otherwise)."""
    if MODE == 5:
        out = (a - a.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
    else:
        out = a
    return out


@triton.jit
def _plain(a, b, MODE: tl.constexpr):
    """One tl.dot in the precision of MODE 0-4 (0 exact fp32, 1 tf32, 2 bf16 operands, 3 fp16 operands, 4 tf32x3);
    casting an operand already cast by ``_op`` is free."""
    if MODE == 0:
        out = tl.dot(a, b, input_precision='ieee')
    elif MODE == 1:
        out = tl.dot(a, b, input_precision='tf32')
    elif MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif MODE == 3:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a, b, input_precision='tf32x3')
    return out


@triton.jit
def _split3(a_hi, a_lo, b_hi, b_lo, LO_A: tl.constexpr, LO_B: tl.constexpr, ILP: tl.constexpr):
    """hi·hi + hi·lo (LO_B) + lo·hi (LO_A) of bf16 hi/lo splits. ILP: the partial products go to separate
    accumulators, so the MMAs need not wait on each other; otherwise one chained accumulator."""
    if ILP:
        out = tl.dot(a_hi, b_hi)
        if LO_B:
            out += tl.dot(a_hi, b_lo)
        if LO_A:
            out += tl.dot(a_lo, b_hi)
    else:
        out = tl.zeros([a_hi.shape[0], b_hi.shape[1]], dtype=tl.float32)
        if LO_B:
            out = tl.dot(a_hi, b_lo, out)
        if LO_A:
            out = tl.dot(a_lo, b_hi, out)
        out = tl.dot(a_hi, b_hi, out)
    return out


@triton.jit
def _mm(a, b, b_lo, MODE: tl.constexpr, SPLIT_B: tl.constexpr, ILP: tl.constexpr = True):
    """a @ b with fp32 accumulation, a the fp32 iterate, b constant (cast once by ``_op`` / ``_lo``). MODE 0-4 as in
    ``_plain``; 5: bf16 hi/lo split of a (and of b when SPLIT_B; b = bf16(B), b_lo = B − b): ~16 mantissa bits."""
    if MODE == 5:
        a_hi = a.to(tl.bfloat16)
        out = _split3(a_hi, (a - a_hi.to(tl.float32)).to(tl.bfloat16), b, b_lo, True, SPLIT_B, ILP)
    else:
        out = _plain(a, b, MODE)
    return out


@triton.jit
def _mm_t(a, a_lo, b, MODE: tl.constexpr, SPLIT_A: tl.constexpr, ILP: tl.constexpr = True):
    """``_mm`` with the constant on the left (the transposed solve: a = H⁰ᵀ or the keys) and the iterate b right."""
    if MODE == 5:
        b_hi = b.to(tl.bfloat16)
        out = _split3(a, a_lo, b_hi, (b - b_hi.to(tl.float32)).to(tl.bfloat16), SPLIT_A, True, ILP)
    else:
        out = _plain(a, b, MODE)
    return out


@triton.jit
def _mm16(y, a16, ILP: tl.constexpr = True):
    """y @ a16 for an iterate y pre-scaled to O(1) rows and a constant a16 already in fp16 (normalised H⁰): y split
    into fp16 hi + lo, two fp16 MMAs. a16's own rounding (2^-12 relative, a fixed perturbation of the operator)
    is left in: in the float64 emulation of benchmarks/solve_precision.py it adds 2e-4 to o, where bf16 for H⁰
    adds 1.6e-3."""
    y_hi = y.to(tl.float16)
    y_lo = (y - y_hi.to(tl.float32)).to(tl.float16)
    if ILP:
        out = tl.dot(y_hi, a16) + tl.dot(y_lo, a16)
    else:
        out = tl.dot(y_hi, a16, tl.dot(y_lo, a16))
    return out


@triton.jit
def _xdot(a, b, AX: tl.constexpr, BX: tl.constexpr, ACC: tl.constexpr):
    """a @ b with fp32 accumulation for fp32 tiles a, b. ACC: 'ieee', 'tf32', 'tf32x3' (tl.dot's precisions) or
    'bf16x3' (bf16 inputs only): hi/lo bf16 splits of the operands that are not exact in bf16 (AX / BX false)."""
    if ACC == 'bf16x3':
        a_hi = a.to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        out = tl.dot(a_hi, b_hi)
        if not BX:
            out += tl.dot(a_hi, (b - b_hi.to(tl.float32)).to(tl.bfloat16))
        if not AX:
            out += tl.dot((a - a_hi.to(tl.float32)).to(tl.bfloat16), b_hi)
    else:
        out = tl.dot(a, b, input_precision=ACC)
    return out
