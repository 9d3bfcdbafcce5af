"""Per-token decode latency and tokens/s vs context length: the GKA LM vs a same-size attention LM with a KV cache.

Both models share one skeleton (GKAForCausalLM with the GKA mixer or a rotary softmax-attention mixer; ~120M
parameters by default: vocab 32000, width 768, 12 layers, 12 heads of 64) and one block-level decode loop
(``lm_common.decode_step``), so they pay the same Python overhead per token.

Context of length L:
- GKA: ``--gka-state prefill`` (default) runs the real model prefill (``gka_chunk`` with
  ``output_final_state=True``) over L random tokens for one row and copies that state to every row of the batch;
  ``random`` draws states of the right shape (PSD Gram). The state has the same size for every L.
- Attention: a preallocated KV cache with L filled slots (random keys and values; the cost of attention does not
  depend on the values), growing by one slot per decoded token.

Then steady-state single-token steps (greedy feedback) are timed with CUDA events after a warm-up, in two modes:
- ``eager``: plain PyTorch calls, so Python and kernel-launch overhead are included (what ``generate`` pays).
  Attention uses SDPA (flash / efficient; cuDNN is excluded: it builds a new plan for every key length).
- ``graph``: the whole decode step captured once as a CUDA graph and replayed, i.e. kernel time only. Attention then
  runs on a static cache over its full buffer (sized to the context) with a position mask, as two batched GEMVs.
  If the GKA step of the default backend cannot be captured, the cell is measured with the torch backend's step
  and the first error is kept in the JSON.
Out-of-memory and other failures are recorded per cell and the sweep continues.

    python benchmarks/decode.py --out results/decode                  # GPU
    GKA_BACKEND=torch python benchmarks/decode.py --quick --out /tmp/decode   # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

import torch

from lm_common import AttnLayerCache, build_lm, decode_step, env_info, finish, is_oom, markdown_table, pyplot

from gka_kernels import resolve_backend
from gka_vision.lm import GKAConfig, GKALayerCache

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def gka_caches(model, L: int, batch: int, mode: str, device, dtype) -> List[GKALayerCache]:
    cfg = model.config
    if mode == 'prefill':
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=device)
        _, cache = model.forward_hidden(ids, use_cache=True)
        return [GKALayerCache(*(t.expand(batch, *t.shape[1:]).contiguous()
                                for t in (c.conv, c.h_kk, c.h_kv))) for c in cache.layers]
    H, D, W = cfg.num_heads, cfg.head_dim, cfg.conv_size - 1
    out = []
    for _ in range(cfg.num_layers):
        k = torch.nn.functional.normalize(torch.randn(batch, H, 64, D, device=device), dim=-1)
        h_kk = k.transpose(-1, -2) @ k  # PSD, like a decayed Gram of unit keys
        h_kv = torch.randn(batch, H, D, D, device=device) * 0.1
        conv = torch.randn(batch, W, (H + 2 * cfg.kv_heads) * D, device=device, dtype=dtype)  # q|k|v tails
        out.append(GKALayerCache(conv, h_kk, h_kv))
    return out


def attn_caches(model, L: int, batch: int, capacity: int, device, dtype, static: bool) -> List[AttnLayerCache]:
    cfg = model.config
    return [AttnLayerCache.allocate(batch, cfg.kv_heads, capacity, cfg.head_dim, L, device, dtype, static=static)
            for _ in range(cfg.num_layers)]


def time_decode(model, caches, batch: int, warmup: int, steps: int, device) -> float:
    """Eager mode: milliseconds per decoded token (one step of the whole batch), greedy feedback."""
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    for _ in range(warmup):
        logits, caches = decode_step(model, tok, caches)
        tok = logits.argmax(-1, keepdim=True)
    sync(device)
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, caches = decode_step(model, tok, caches)
        tok = logits.argmax(-1, keepdim=True)
    if device.type == 'cuda':
        end.record()
        sync(device)
        return start.elapsed_time(end) / steps
    return (time.perf_counter() - t0) * 1e3 / steps


def time_decode_graph(model, caches, batch: int, warmup: int, steps: int, device) -> float:
    """CUDA-graph mode: one decode step (every layer, head and argmax) captured once and replayed; the caches are
    updated in place, so only kernel time is measured, not Python and launch overhead."""
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step():
        logits, new = decode_step(model, tok, caches)
        for old_c, new_c in zip(caches, new):
            if new_c is not old_c:  # GKA returns fresh state tensors: write them back into the static buffers
                for name, t in vars(new_c).items():
                    if isinstance(t, torch.Tensor):
                        getattr(old_c, name).copy_(t)
        tok.copy_(logits.argmax(-1, keepdim=True))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(2, warmup)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / steps


def _measure_once(kind: str, model, L: int, batch: int, mode: str, args, device, dtype, rec: Dict) -> None:
    t0 = time.perf_counter()
    if kind == 'gka':
        caches = gka_caches(model, L, batch, args.gka_state, device, dtype)
    else:
        # Room for the warm-up, the graph capture and replays (static mode attends over the whole buffer).
        caches = attn_caches(model, L, batch, L + 2 * args.warmup + args.steps + 8, device, dtype,
                             static=mode == 'graph')
    sync(device)
    rec['setup_s'] = round(time.perf_counter() - t0, 3)
    rec['cache_MiB'] = round(sum(t.numel() * t.element_size() for c in caches
                                 for t in vars(c).values() if isinstance(t, torch.Tensor)) / 2 ** 20, 2)
    timer = time_decode_graph if mode == 'graph' else time_decode
    ms = timer(model, caches, batch, args.warmup, args.steps, device)
    rec['ms_per_token'] = round(ms, 4)
    rec['tokens_per_s'] = round(batch * 1e3 / ms, 1)


def measure(kind: str, model, L: int, batch: int, mode: str, args, device, dtype) -> Dict:
    rec: Dict = {'kind': kind, 'context': L, 'batch': batch, 'mode': mode}
    if kind == 'gka':
        rec['gka_backend'] = resolve_backend(None, device)
    try:
        _measure_once(kind, model, L, batch, mode, args, device, dtype, rec)
    except Exception as err:  # noqa: BLE001 - record and go on with the sweep
        rec['error'] = ('OOM' if is_oom(err) else 'error') + f': {type(err).__name__}: {err}'[:300]
        if kind == 'gka' and mode == 'graph' and rec['gka_backend'] != 'torch' and not is_oom(err):
            # A kernel that cannot be captured in a CUDA graph: measure the torch backend's step instead.
            saved = os.environ.get('GKA_BACKEND')
            os.environ['GKA_BACKEND'] = 'torch'
            try:
                retry = {'gka_backend': 'torch', 'first_error': rec.pop('error')}
                _measure_once(kind, model, L, batch, mode, args, device, dtype, retry)
                rec.update(retry)
            except Exception as err2:  # noqa: BLE001
                rec['error'] = ('OOM' if is_oom(err2) else 'error') + f': {type(err2).__name__}: {err2}'[:300]
            finally:
                if saved is None:
                    os.environ.pop('GKA_BACKEND', None)
                else:
                    os.environ['GKA_BACKEND'] = saved
    finally:
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rec


def plot(results: List[Dict], args, path: str) -> Optional[str]:
    plt = pyplot()
    if isinstance(plt, str):
        return plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in args.modes:
        for batch in args.batch:
            for kind, style in (('gka', '-o'), ('attention', '--s')):
                pts = [(r['context'], r['ms_per_token'], r['tokens_per_s']) for r in results
                       if r['kind'] == kind and r['batch'] == batch and r['mode'] == mode and 'ms_per_token' in r]
                if not pts:
                    continue
                ctx, ms, tps = zip(*pts)
                label = f'{"GKA" if kind == "gka" else "Attention + KV cache"}, batch {batch}, {mode}'
                axes[0].plot(ctx, ms, style, label=label)
                axes[1].plot(ctx, tps, style, label=label)
    for ax, ylabel in zip(axes, ('ms per decoded token', 'tokens / s')):
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('context length (tokens)')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which='both')
    axes[0].legend(fontsize=7)
    fig.suptitle('Decode step vs context length')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', default='results/decode', help='output folder (JSON, markdown, PNG)')
    p.add_argument('--quick', action='store_true', help='CPU smoke run: tiny model, short contexts, few steps')
    p.add_argument('--contexts', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument('--batch', type=int, nargs='+', default=[1, 16])
    p.add_argument('--steps', type=int, default=50, help='timed decode steps per cell')
    p.add_argument('--warmup', type=int, default=8)
    p.add_argument('--dtype', choices=list(DTYPES), default='bf16')
    p.add_argument('--gka-state', choices=['prefill', 'random'], default='prefill')
    p.add_argument('--vocab', type=int, default=32000)
    p.add_argument('--hidden', type=int, default=768)
    p.add_argument('--layers', type=int, default=12)
    p.add_argument('--heads', type=int, default=12)
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--num-iter', type=int, default=30)
    p.add_argument('--modes', nargs='+', choices=['eager', 'graph'], default=None,
                   help='eager: plain PyTorch calls (includes Python/launch overhead); graph: one CUDA graph per '
                        'decode step (kernel time only). Default: both on CUDA, eager on CPU')
    p.add_argument('--backend', choices=['triton', 'torch', 'naive'], default=None,
                   help='GKA kernel backend (sets GKA_BACKEND); default: triton on CUDA when available, else torch')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    if p.parse_known_args(argv)[0].quick:  # tiny defaults; flags given explicitly still win
        p.set_defaults(contexts=[64, 256], batch=[1, 2], steps=4, warmup=2, vocab=256, hidden=64, layers=2, heads=2,
                       head_dim=32, dtype='fp32')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend:
        os.environ['GKA_BACKEND'] = args.backend
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = DTYPES[args.dtype]
    if args.modes is None:
        args.modes = ['eager', 'graph'] if device.type == 'cuda' else ['eager']
    if 'graph' in args.modes and device.type != 'cuda':
        raise SystemExit('--modes graph needs a CUDA device')
    # The forget gate is <= 0 by construction; the kernels' value check would read it back (a device sync per layer
    # and token, and no sync is allowed inside a CUDA graph).
    os.environ['GKA_CHECK_VALUES'] = '0'
    t_start = time.perf_counter()
    cfg = GKAConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                    head_dim=args.head_dim, num_iter=args.num_iter)
    models, params = {}, {}
    for kind in ('gka', 'attention'):
        torch.manual_seed(0)
        models[kind] = build_lm(kind, cfg).to(device=device, dtype=dtype).eval()
        params[kind] = models[kind].num_parameters()
    results = []
    # cuDNN attention builds a plan per new key length (every decode step): keep SDPA on flash / efficient / math.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.inference_mode(), sdpa_kernel(backends):
        for mode in args.modes:
            for batch in args.batch:
                for L in args.contexts:
                    for kind in ('gka', 'attention'):
                        rec = measure(kind, models[kind], L, batch, mode, args, device, dtype)
                        results.append(rec)
                        print(rec, flush=True)

    def cell(kind, L, batch, mode, key):
        r = next(r for r in results if r['kind'] == kind and r['context'] == L and r['batch'] == batch
                 and r['mode'] == mode)
        return r.get(key, r.get('error', '-')[:24])

    headers = ['mode', 'batch', 'context', 'GKA ms/token', 'GKA tokens/s', 'Attn ms/token', 'Attn tokens/s',
               'GKA / Attn throughput', 'GKA state MiB', 'KV cache MiB', 'GKA backend']
    rows, flat = [], {}
    for mode in args.modes:
        for batch in args.batch:
            lat = []
            for L in args.contexts:
                g, a = cell('gka', L, batch, mode, 'tokens_per_s'), cell('attention', L, batch, mode, 'tokens_per_s')
                ratio = f'{g / a:.2f}x' if isinstance(g, float) and isinstance(a, float) else '-'
                gm = cell('gka', L, batch, mode, 'ms_per_token')
                if isinstance(gm, float):
                    lat.append(gm)
                rows.append([mode, batch, L, gm, g, cell('attention', L, batch, mode, 'ms_per_token'), a, ratio,
                             cell('gka', L, batch, mode, 'cache_MiB'), cell('attention', L, batch, mode, 'cache_MiB'),
                             cell('gka', L, batch, mode, 'gka_backend')])
            if lat:
                flat[f'{mode}, batch {batch}'] = round(max(lat) / min(lat), 3)
    table = markdown_table(headers, rows)
    setup = (f'decode, {args.dtype}, device {device}; GKA {params["gka"] / 1e6:.1f}M params (num_iter '
             f'{args.num_iter}, backend {env_info(device)["gka_backend"]}, state from {args.gka_state}), attention '
             f'{params["attention"] / 1e6:.1f}M params (SDPA, static KV cache); {args.steps} timed steps after '
             f'{args.warmup} warm-up; GKA max/min ms-per-token across contexts: {flat}')
    payload = {'setup': setup, 'args': vars(args), 'params': params, 'env': env_info(device),
               'gka_latency_spread_max_over_min': flat, 'results': results,
               'total_s': round(time.perf_counter() - t_start, 1)}
    return finish(args.out, 'decode', payload, setup, table, lambda png: plot(results, args, png))


if __name__ == '__main__':
    raise SystemExit(main())
