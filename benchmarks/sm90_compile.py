"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU and count what the loop became.

The device lease is short, so a kernel variant is first checked here: does it compile for sm_90, does the solve
loop use wgmma (64-row tiles per warpgroup) or mma.sync, does anything spill to local memory, how much shared memory
does a program take, and what ptxas made of it: registers per thread, bytes spilled, spill instructions inside the
SASS loops (Triton's compiler runs up to PTX for a `GPUTarget('cuda', 90, 32)`, then Triton's bundled ptxas and
nvdisasm; nothing executes).

    python benchmarks/sm90_compile.py                                   # the default forward and backward kernels
    python benchmarks/sm90_compile.py --kernel solve --mode 6 --chunk 64 --fast 15
    python benchmarks/sm90_compile.py --kernel bwd --mode 6
    python benchmarks/sm90_compile.py --kernel bwd --mode 6 --maxnreg 168    # what a register cap spills

MODE numbers as in kernels/triton/solve.py (5 bf16x3, 6 h16x2 with bf16 inputs; FAST steps run MODE 2 after
MODE 5 and MODE 8 after MODE 6). Triton here may be newer than the GPU machine's, which can lower differently.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gka_kernels.triton.backward_kernels import _bwd_chunk_kernel
from gka_kernels.triton.solve import _chunk_solve_kernel
from gka_kernels.triton.state_pass import _chunk_increments_kernel, _chunk_states_kernel

FLOAT_ARGS = ('r', 'scale', 'f_min')
BF16_PTRS = {'q_ptr', 'k_ptr', 'v_ptr', 'al_ptr', 'do_ptr', 'dq_ptr', 'dv_ptr', 'x_ptr', 'o_ptr', 'a_ptr', 'x2_ptr'}


def compile_counts(kernel, const: dict, num_warps: int, fp32_ptrs=(), maxnreg=None) -> dict:
    names = kernel.arg_names
    sig = {}
    for n in names:
        if n in const:
            sig[n] = 'constexpr'
        elif n.endswith('_ptr'):
            sig[n] = '*bf16' if n in BF16_PTRS and n not in fp32_ptrs else '*fp32'
        else:
            sig[n] = 'fp32' if n in FLOAT_ARGS else 'i32'
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    options = dict(num_warps=num_warps, **({'maxnreg': maxnreg} if maxnreg else {}))
    compiled = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=options)
    ptx = compiled.asm['ptx']
    res = dict(wgmma=len(re.findall(r'wgmma\.mma_async', ptx)), mma_sync=len(re.findall(r'mma\.sync', ptx)),
               spills=len(re.findall(r'ld\.local|st\.local', ptx)), shared=compiled.metadata.shared)
    res.update(_ptxas_usage(ptx))
    return res


def _ptxas_usage(ptx: str) -> dict:
    """Registers per thread, the bytes ptxas spills, and the spill instructions (LDL/STL) inside loops of the SASS.
    The PTX counts above see only what Triton itself spilled; a kernel past 255 registers, or past a ``--maxnreg``
    cap, spills in ptxas, and a spill inside the solve loop costs at every step where one outside costs once."""
    bindir = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
    if not os.path.exists(os.path.join(bindir, 'ptxas')):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, 'k.ptx'), os.path.join(tmp, 'k.cubin')
        with open(src, 'w') as fh:
            fh.write(ptx)
        out = subprocess.run([os.path.join(bindir, 'ptxas'), '-v', '--gpu-name', 'sm_90a', src, '-o', cubin],
                             capture_output=True, text=True)
        log = out.stdout + out.stderr
        sass = ''
        if out.returncode == 0 and os.path.exists(os.path.join(bindir, 'nvdisasm')):
            sass = subprocess.run([os.path.join(bindir, 'nvdisasm'), '-c', cubin], capture_output=True,
                                  text=True).stdout
    regs = re.search(r'Used (\d+) registers', log)
    spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    res = dict(registers=int(regs.group(1)) if regs else None,
               ptxas_spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else None)
    if sass:
        res['loop_spill_ops'] = _loop_spills(sass)
    return res


def _loop_spills(sass: str) -> list:
    """LDL/STL instructions inside each loop (a branch back to an earlier label) of a disassembled cubin."""
    labels, ins, pending = {}, [], None
    for line in sass.splitlines():
        m = re.match(r'\s*\.L_x_(\d+):', line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);', line)
        if m:
            addr = int(m.group(1), 16)
            if pending is not None:
                labels[pending], pending = addr, None
            ins.append((addr, m.group(2)))
    loops = sorted({(labels[m.group(1)], addr) for addr, txt in ins
                    for m in [re.search(r'BRA.*?\.L_x_(\d+)', txt)] if m and labels.get(m.group(1), addr) < addr})
    spills = [a for a, txt in ins if re.search(r'\b(LDL|STL)\b', txt)]
    return [sum(lo <= a <= hi for a in spills) for lo, hi in loops]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--kernel', choices=['solve', 'bwd', 'both', 'states'], default='both',
                   help='states: the forward state pass, alone and as the Gram + KV pair (GKA_TRITON_STATE_PAIR), and '
                        'the parallel level of the two-level pass (GKA_TRITON_STATE_SCAN=2)')
    p.add_argument('--mode', type=int, default=5)
    p.add_argument('--chunk', type=int, default=64, help='forward chunk')
    p.add_argument('--bwd-chunk', type=int, default=16, help='chunk of the fused backward (GKA_TRITON_BWD_CHUNK)')
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--warps', type=int, default=None, help='default: as kernels/triton/solve._num_warps')
    p.add_argument('--fast', type=int, default=None,
                   help='leading single-pass steps (GKA_TRITON_FAST_ITERS; default: the schedule of the ridge ratio)')
    p.add_argument('--fast-dot', choices=['fp16', 'lowp'], default='fp16', help='GKA_TRITON_FAST_DOT')
    p.add_argument('--maxnreg', type=int, default=None,
                   help='ptxas register cap (maxnreg) of the solve and backward kernels; both take 255 uncapped, '
                        '168 would fit three 4-warp programs per SM (measured slower: KERNEL_NOTES.md v29)')
    p.add_argument('--ridge-ratio', type=float, default=0.02)
    p.add_argument('--iters', type=int, default=30)
    args = p.parse_args(argv)
    from gka_kernels.triton.solve import _num_warps, solve_schedule
    os.environ['GKA_TRITON_FAST_DOT'] = args.fast_dot
    if args.fast is not None:
        os.environ['GKA_TRITON_FAST_ITERS'] = str(args.fast)
    sched = solve_schedule(args.mode, args.iters, args.ridge_ratio)
    args.fast = sched['FAST']
    common = dict(D=args.dim, N=args.iters, MODE=args.mode, FAST=sched['FAST'], FAST_MODE=sched['FAST_MODE'],
                  ILP=True, TRANS=False, ACC='bf16x3')
    if args.kernel in ('solve', 'both'):
        const = dict(common, DV=args.dim, C=args.chunk, LOAD_F=False, READOUT=True, STORE_X=True)
        warps = args.warps or _num_warps(args.dim, args.chunk)
        res = compile_counts(_chunk_solve_kernel, const, warps, fp32_ptrs=('x_ptr',), maxnreg=args.maxnreg)
        print(f'forward solve  D={args.dim} C={args.chunk} MODE={args.mode} FAST={args.fast} warps={warps}: {res}')
    if args.kernel == 'states':
        for pair in (False, True):
            const = dict(DA=args.dim, DX=args.dim, DX2=args.dim, C=args.chunk, BA=32, BX=32, HAS_INIT=True,
                         STORE_FINAL=True, REVERSE=False, PREC='bf16x3', X_EXACT=True, PAIR=pair, MIX=False)
            res = compile_counts(_chunk_states_kernel, const, 4)
            print(f'state pass     D={args.dim} C={args.chunk} PAIR={pair} warps=4: {res}')
            const = dict(DA=args.dim, DX=args.dim, DX2=args.dim, C=args.chunk, REVERSE=False, PREC='bf16x3',
                         X_EXACT=True, PAIR=pair, MIX=False)
            res = compile_counts(_chunk_increments_kernel, const, 4)
            print(f'increments     D={args.dim} C={args.chunk} PAIR={pair} warps=4: {res}')
    if args.kernel in ('bwd', 'both'):
        C = args.bwd_chunk
        warps = args.warps or _num_warps(args.dim, C)
        for sr in (1, 2, 4):   # sub-chunks per recomputed state chunk (config.backward_state_chunk)
            if C * sr > 64:
                continue
            const = dict(common, DV=args.dim, C=C, SR=sr)
            res = compile_counts(_bwd_chunk_kernel, const, warps, fp32_ptrs=('x_ptr',), maxnreg=args.maxnreg)
            print(f'backward SR={sr} D={args.dim} C={C} MODE={args.mode} FAST={args.fast} warps={warps}: {res}')


if __name__ == '__main__':
    main()
