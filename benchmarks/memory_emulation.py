"""Inference activation memory of the CUDA code path, emulated on a CPU.

The Triton kernels run under TRITON_INTERPRET=1 with their launches turned into no-ops (only the tensors the code
allocates matter here, not their values), the fused glue and patch GEMM are forced on as on CUDA (and the fused
LayerNorm for inference, its CUDA default), and tests/live_bytes.py counts live tensor bytes under bf16 autocast.
The peak is what benchmarks/models.py measures on the GPU as activation memory (peak allocated minus weights and
inputs), up to ops that differ between CPU and CUDA: on 2026-11-29 the emulation read 808 MiB for DeiT-S and 1,011 /
1,131 MiB for gka_small (64 / 256 MB state cap) at 1024 px, batch 16, where the H200 measured 768, 901 and 1,024
MiB; differences between two versions of our code matched to a few MiB. Use it to find what is alive at the peak and
to check a memory change before a GPU run confirms it.

    python benchmarks/memory_emulation.py --models gka_small deit_small_patch16_224 --size 1024 --batch 16 --top 12
    python benchmarks/memory_emulation.py --models gka_small --size 512 --batch 8 --mode train --group 12
    python benchmarks/memory_emulation.py --models gka_small --size 224 --batch 2 --mode compiled-train
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('GKA_BACKEND', 'triton')
os.environ.setdefault('GKA_FUSED_GLUE', '1')
os.environ.setdefault('GKA_PATCH_GEMM', '1')

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab import Switch  # noqa: E402
from live_bytes import LiveBytes, grouped  # noqa: E402
from provenance import provenance  # noqa: E402


def _noop_kernels() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def measure(name: str, size: int, batch: int, mode: str = 'infer') -> LiveBytes:
    """The allocation peak of one inference forward, or (mode 'train') of a training step's forward and backward
    (cross entropy on random labels; the parameter gradients count, as they do on the GPU, where models.py takes
    its baseline after zero_grad(set_to_none=True))."""
    import timm
    import gka_vision  # noqa: F401  (registers the GKA models)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size)
    model.train(mode == 'train')
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.num_classes, (batch,))
    keep = list(model.parameters()) + list(model.buffers()) + [x, y]
    if mode == 'infer':
        # on CUDA the fused LayerNorm is the default without autograd (add_norm.py)
        with Switch({'GKA_FUSED_NORM': os.environ.get('GKA_FUSED_NORM') or '1'}), torch.no_grad(), \
                torch.autocast('cpu', dtype=torch.bfloat16), LiveBytes(keep) as lb:
            out = model(x)
            del out
        return lb
    with LiveBytes(keep) as lb:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
    return lb


def compiled_saved(name: str, size: int, batch: int) -> dict:
    """What a torch.compile'd training step keeps for its backward: the saved inputs of the backward graphs (not the
    parameters, the model input or the incoming gradients) with AOT autograd's min-cut partitioner, which inductor
    uses, and the kernels as no-ops. Only compiled graphs count: with graph breaks (GKA_COMPILE_CORE=0) what the
    glue kernels' autograd nodes keep between the graphs is not in it, so compare one-graph variants."""
    import timm
    import gka_vision  # noqa: F401
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    saved = []

    def backward_compiler(gm, example_inputs):
        inputs = [n for n in gm.graph.nodes if n.op == 'placeholder']
        saved.append(sum(t.numel() * t.element_size() for n, t in zip(inputs, example_inputs)
                         if isinstance(t, torch.Tensor) and not n.name.startswith(('tangents', 'primals'))))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward_compiler,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size).train()
    x = torch.randn(batch, 3, size, size)
    torch._dynamo.reset()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = torch.compile(model, backend=backend)(x)
    out.float().sum().backward()
    torch._dynamo.reset()
    return dict(model=name, size=size, batch=batch, mode='compiled-train', saved_bytes=sum(saved),
                saved_mib=round(sum(saved) / 2 ** 20, 2), graphs=len(saved))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['gka_small', 'deit_small_patch16_224'])
    p.add_argument('--size', type=int, default=1024)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--mode', choices=['infer', 'train', 'compiled-train'], default='infer',
                   help="compiled-train: what a torch.compile'd training step's graphs keep for the backward")
    p.add_argument('--top', type=int, default=0, help='list the largest tensors alive at the peak')
    p.add_argument('--group', type=int, default=0,
                   help='list the largest groups of same-shaped tensors alive at the peak (op, shape, dtype)')
    p.add_argument('--out', default=None, help='write the rows as JSON here')
    args = p.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') != '1':
        p.error('needs TRITON_INTERPRET=1 (the default when unset): the kernels must run in the interpreter')
    _noop_kernels()
    rows = []
    for name in args.models:
        t0 = time.time()
        if args.mode == 'compiled-train':
            row = compiled_saved(name, args.size, args.batch)
            row['seconds'] = round(time.time() - t0, 1)
            rows.append(row)
            print(f"{name:28s} compiled training {args.size} px, batch {args.batch}: {row['saved_mib']:8.2f} MiB "
                  f"kept for the backward by {row['graphs']} graph(s)", flush=True)
            continue
        lb = measure(name, args.size, args.batch, args.mode)
        row = dict(model=name, size=args.size, batch=args.batch, mode=args.mode, peak_bytes=lb.peak,
                   peak_mib=round(lb.peak / 2 ** 20, 1), seconds=round(time.time() - t0, 1),
                   at_peak=[dict(mib=round(n / 2 ** 20, 1), op=d[0], shape=list(d[1]), dtype=d[2])
                            for n, d in lb.at_peak[:args.top]])
        rows.append(row)
        print(f"{name:28s} {args.mode} {args.size} px, batch {args.batch}: {row['peak_mib']:8.1f} MiB", flush=True)
        for t in row['at_peak']:
            print(f"    {t['mib']:7.1f} MiB  {t['op']}  {t['shape']}  {t['dtype']}")
        if args.group:
            row['groups'] = grouped(lb.at_peak)[:args.group]
            for grp in row['groups']:
                print(f"    {grp['mib']:7.1f} MiB  {grp['count']:3d} x  {grp['op']}  {grp['shape']}  {grp['dtype']}")
    if args.out:
        with open(args.out, 'w') as fh:
            json.dump(dict(provenance=provenance(), rows=rows), fh, indent=1)


if __name__ == '__main__':
    main()
