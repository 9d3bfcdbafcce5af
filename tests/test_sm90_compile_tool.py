"""benchmarks/sm90_compile.py: the SASS reading that says where ptxas spilled (inside a loop or not), on a hand-made
listing, and one real offline sm_90 compile of the fused backward through Triton's bundled ptxas."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason='the tool compiles through triton, which is not installed')

# two loops: .L_x_1 (0x20-0x50) holds one STL and one LDL, .L_x_2 (0x80-0x90) none; the LDL at 0x60 and the STL at
# 0x00 lie outside both, and the forward branch at 0x70 is not a loop
SASS = """
        /*0000*/                   STL [R1], R2 ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32 R4, R8, R10, R4 ;
        /*0030*/                   STL.64 [R1+0x8], R4 ;
        /*0040*/                   LDL R6, [R1+0x10] ;
        /*0050*/              @P0  BRA `(.L_x_1) ;
        /*0060*/                   LDL R7, [R1] ;
        /*0070*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*0080*/                   FADD R1, R2, R3 ;
        /*0090*/              @P1  BRA `(.L_x_2) ;
.L_x_3:
        /*00a0*/                   EXIT ;
"""


def test_loop_spills_counts_only_what_lies_inside_each_loop():
    import sm90_compile
    assert sm90_compile._loop_spills(SASS) == [2, 0]


def test_compile_reports_registers_and_spills():
    """The default fused backward compiles for sm_90 and ptxas reports its registers and spills; it must use
    wgmma or mma.sync (a tensor-core loop), never more than ptxas's 255 registers."""
    import sm90_compile
    from gka_kernels.triton.backward_kernels import _bwd_chunk_kernel
    from gka_kernels.triton.solve import solve_schedule
    sched = solve_schedule(6, 4, 0.02)
    const = dict(D=32, DV=32, C=16, N=4, MODE=6, FAST=sched['FAST'], FAST_MODE=sched['FAST_MODE'], ILP=True,
                 TRANS=False, ACC='bf16x3', SR=1)
    res = sm90_compile.compile_counts(_bwd_chunk_kernel, const, 4, fp32_ptrs=('x_ptr',))
    assert res['wgmma'] + res['mma_sync'] > 0, res
    if 'registers' in res:   # Triton's wheel bundles ptxas; a build without it reports the PTX counts only
        assert 0 < res['registers'] <= 255 and res['ptxas_spill_bytes'] >= 0, res
        assert all(n >= 0 for n in res['loop_spill_ops']), res
