"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023, arXiv 2312.04927) for the causal GKA LM.

Task (one sequence of ``seq_len`` inputs): ``n`` key-value pairs ``k1 v1 k2 v2 ... kn vn`` (distinct keys from the
lower half of the vocabulary, values from the upper half), then filler tokens (id 0) among which every key is asked
again once, followed by its value. Query keys sit at power-law distributed distances (short gaps are likelier, as in
Zoology). The model is trained as a causal LM, but the loss and the accuracy only count the positions where the next
token is a queried value (argmax must equal it).

Models (two blocks each, same width and heads, same skeleton: embedding, pre-norm mixer + SwiGLU MLP, final RMSNorm,
tied head): GKA (num_iter 30), the same with num_iter 0 (its gated-linear-attention readout) and softmax attention
(rotary, PyTorch SDPA). Each width is trained once on a mix of the pair counts (a batch per count, in turn) and
evaluated on held-out data of every count.

Budget: all models train for the same number of steps. The step count is ``--steps``, lowered when needed so that
the whole sweep fits ``--budget-s`` seconds, using per-step times measured in a short calibration pass. Defaults:
batch 256, vocab 256 (Zoology: 8192; smaller so the embeddings train within the budget), AdamW lr 3e-3 with
warm-up and cosine decay, bf16 autocast, at most 4000 steps within 300 s of training. Measured on an H200 at batch
128: ~23 ms per step for either GKA model and ~11 ms for attention (launch-bound at these sizes), i.e. about 1,600
steps per model for the 9 models; with calibration and evaluation the run takes about 6 minutes. The loss and the
LM head only touch the query positions.

    python benchmarks/mqar.py --out results/mqar            # GPU: the full sweep (about 6 minutes on an H200)
    GKA_BACKEND=torch python benchmarks/mqar.py --quick --out /tmp/mqar   # CPU smoke run at tiny size
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from lm_common import build_lm, env_info, finish, is_oom, markdown_table, pyplot

from gka_vision.lm import GKAConfig
from gka_vision.lm.model import IGNORE_INDEX

RUN_OVERHEAD_S = 3.0
MODELS = {  # name -> (kind, num_iter)
    'GKA (N=30)': ('gka', 30),
    'GKA N=0 (GLA readout)': ('gka', 0),
    'Attention': ('attention', 30),
}


def mqar_batch(batch: int, seq_len: int, num_pairs: int, vocab: int, power_a: float,
               generator: torch.Generator, device: torch.device):
    """Inputs [B, seq_len] and labels [B, seq_len] (IGNORE_INDEX except where the next token is a queried value)."""
    half = vocab // 2
    if half - 1 < num_pairs:
        raise ValueError(f'vocab {vocab} too small for {num_pairs} distinct keys')
    total = seq_len + 1  # inputs and labels are this sequence shifted by one
    slots = (total - 2 * num_pairs) // 2
    if slots < num_pairs:
        raise ValueError(f'seq_len {seq_len} too short for {num_pairs} pairs and their queries '
                         f'(needs >= {4 * num_pairs - 1})')
    g = generator
    keys = torch.rand(batch, half - 1, generator=g, device=device).argsort(-1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab, (batch, num_pairs), generator=g, device=device)
    seq = torch.zeros(batch, total, dtype=torch.long, device=device)
    seq[:, 0:2 * num_pairs:2] = keys
    seq[:, 1:2 * num_pairs:2] = values
    # Query slot j (a key at 2n + 2j, its value right after) chosen with weight ∝ (j + 1)^(a − 1), no repeats.
    w = (torch.arange(slots, device=device, dtype=torch.float32) + 1) ** (power_a - 1)
    chosen = torch.multinomial(w.expand(batch, slots).contiguous(), num_pairs, replacement=False, generator=g)
    order = torch.rand(batch, num_pairs, generator=g, device=device).argsort(-1)  # queries in random key order
    qpos = 2 * num_pairs + 2 * chosen
    seq.scatter_(1, qpos, keys.gather(1, order))
    seq.scatter_(1, qpos + 1, values.gather(1, order))
    inputs, targets = seq[:, :-1], seq[:, 1:]
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels.scatter_(1, qpos, targets.gather(1, qpos))  # position of the query key predicts its value
    return inputs, labels


def make_config(width: int, args, num_iter: int) -> GKAConfig:
    head_dim = min(args.head_dim, width)
    return GKAConfig(vocab_size=args.vocab, hidden_size=width, num_layers=2, num_heads=max(1, width // head_dim),
                     head_dim=head_dim, num_iter=num_iter, mlp_ratio=args.mlp_ratio)


def query_logits(model, inputs, labels, amp_dtype, device):
    """Logits at the query positions only (a quarter or less of the sequence: the head is the costly part)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        h, _ = model.forward_hidden(inputs, use_cache=False, check_ids=False)
        mask = labels != IGNORE_INDEX
        return model.lm_head(h[mask]).float(), labels[mask]


def loss_fn(model, inputs, labels, amp_dtype, device):
    logits, targets = query_logits(model, inputs, labels, amp_dtype, device)
    return F.cross_entropy(logits, targets)


def make_optimizer(model, lr: float, weight_decay: float):
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in skip or n.startswith('embed_tokens') else decay).append(p)
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                              {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, total: int, base: float, warmup_frac: float = 0.1) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(model, opt, args, device, amp_dtype, n: int) -> float:
    """Seconds per optimizer step (median-free mean over n steps after the caller's warm-up)."""
    g = torch.Generator(device=device).manual_seed(1234)
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        inputs, labels = mqar_batch(args.batch, args.seq_len, args.pairs[i % len(args.pairs)], args.vocab,
                                    args.power_a, g, device)
        loss = loss_fn(model, inputs, labels, amp_dtype, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def evaluate(model, args, device, amp_dtype, num_pairs: int) -> float:
    g = torch.Generator(device=device).manual_seed(10_000 + num_pairs)  # same held-out set for every model
    correct = total = 0
    for _ in range(args.eval_batches):
        inputs, labels = mqar_batch(args.batch, args.seq_len, num_pairs, args.vocab, args.power_a, g, device)
        logits, targets = query_logits(model, inputs, labels, amp_dtype, device)
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
    return correct / max(1, total)


def build(name: str, width: int, args, device, lr: Optional[float] = None):
    kind, num_iter = MODELS[name]
    torch.manual_seed(args.seed)
    model = build_lm(kind, make_config(width, args, num_iter)).to(device).train()
    return model, make_optimizer(model, args.lr[0] if lr is None else lr, args.weight_decay)


def calibrate(runs, args, device, amp_dtype) -> Dict:
    """Per-step seconds of every (model, width), measured after a warm-up; failures (OOM, errors) are recorded."""
    out = {}
    for name, width in runs:
        try:
            model, opt = build(name, width, args, device)
            time_steps(model, opt, args, device, amp_dtype, args.calib_warmup)
            out[(name, width)] = time_steps(model, opt, args, device, amp_dtype, args.calib_steps)
        except Exception as err:  # noqa: BLE001 - one failing model must not stop the sweep
            out[(name, width)] = ('OOM' if is_oom(err) else 'error') + f': {type(err).__name__}: {err}'[:300]
        finally:
            model = opt = None
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return out


def train_one(name: str, width: int, steps: int, args, device, amp_dtype, lr: float) -> Dict:
    rec: Dict = {'model': name, 'width': width, 'steps': steps, 'lr': lr}
    try:
        model, opt = build(name, width, args, device, lr)
        rec['params'] = model.num_parameters()
        g = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.perf_counter()
        losses = []
        for step in range(steps):
            for group in opt.param_groups:
                group['lr'] = lr_at(step, steps, lr)
            inputs, labels = mqar_batch(args.batch, args.seq_len, args.pairs[step % len(args.pairs)], args.vocab,
                                        args.power_a, g, device)
            loss = loss_fn(model, inputs, labels, amp_dtype, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % max(1, steps // 20) == 0 or step == steps - 1:
                losses.append((step, round(float(loss.detach()), 4)))
        sync(device)
        rec['train_s'] = round(time.perf_counter() - t0, 2)
        rec['loss_curve'] = losses
        model.eval()
        rec['accuracy'] = {n: round(evaluate(model, args, device, amp_dtype, n), 4) for n in args.pairs}
    except Exception as err:  # noqa: BLE001
        rec['error'] = ('OOM' if is_oom(err) else 'error') + f': {type(err).__name__}: {err}'[:300]
    finally:
        model = opt = None
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rec


def plot(results: List[Dict], args, path: str) -> Optional[str]:
    plt = pyplot()
    if isinstance(plt, str):
        return plt
    fig, axes = plt.subplots(1, len(args.pairs), figsize=(4.2 * len(args.pairs), 3.6), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], args.pairs):
        for name in MODELS:
            pts = [(r['width'], r['accuracy'][n]) for r in results if r['model'] == name and 'accuracy' in r]
            if pts:
                ax.plot(*zip(*pts), marker='o', label=name)
        ax.set_xscale('log', base=2)
        ax.set_xticks(args.widths, [str(w) for w in args.widths])
        ax.set_title(f'{n} key-value pairs, T={args.seq_len}')
        ax.set_xlabel('model width')
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('MQAR accuracy (query positions)')
    axes[0][-1].legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', default='results/mqar', help='output folder (JSON, markdown, PNG)')
    p.add_argument('--quick', action='store_true', help='CPU smoke run: tiny widths, vocab, length and budget')
    p.add_argument('--widths', type=int, nargs='+', default=[64, 128, 256])
    p.add_argument('--pairs', type=int, nargs='+', default=[16, 32, 64])
    p.add_argument('--seq-len', type=int, default=256)
    p.add_argument('--vocab', type=int, default=256,
                   help='Zoology uses 8192; 256 (127 keys, 128 values) lets the embeddings train within the 6-minute '
                        'budget (at 8192, 800 steps of batch 128 on an H200 left every model below 0.2 accuracy)')
    p.add_argument('--head-dim', type=int, default=64, help='heads = width // head_dim')
    p.add_argument('--mlp-ratio', type=float, default=2.0)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--steps', type=int, default=4000, help='steps per model (upper bound; see --budget-s)')
    p.add_argument('--budget-s', type=float, default=300.0,
                   help='training-time budget for the whole sweep; lowers --steps to fit (0 = no limit)')
    p.add_argument('--lr', type=float, nargs='+', default=[3e-3],
                   help='peak learning rates; with several, each model trains once per rate and reports its best')
    p.add_argument('--weight-decay', type=float, default=0.1)
    p.add_argument('--power-a', type=float, default=0.01, help='query-gap power law exponent (Zoology: 0.01)')
    p.add_argument('--eval-batches', type=int, default=4)
    p.add_argument('--calib-warmup', type=int, default=3)
    p.add_argument('--calib-steps', type=int, default=5)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--backend', choices=['triton', 'torch', 'naive'], default=None,
                   help='GKA kernel backend (sets GKA_BACKEND); default: triton on CUDA when available, else torch')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--no-amp', action='store_true', help='fp32 instead of bf16 autocast on CUDA')
    p.add_argument('--replot', nargs='+', metavar='JSON', help='no training: table and plot from earlier results')
    if p.parse_known_args(argv)[0].quick:  # tiny defaults; flags given explicitly still win
        p.set_defaults(widths=[32, 64], pairs=[4, 8], seq_len=64, vocab=128, head_dim=16, batch=16, steps=30,
                       budget_s=0.0, eval_batches=2, calib_warmup=1, calib_steps=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args)
    if args.backend:
        os.environ['GKA_BACKEND'] = args.backend
    # The forget gate is <= 0 by construction; skip the kernels' value check (a device sync per layer and step).
    os.environ['GKA_CHECK_VALUES'] = '0'
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    amp_dtype = torch.bfloat16 if device.type == 'cuda' and not args.no_amp else None
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    runs = [(name, w) for w in args.widths for name in args.models]

    calib = calibrate(runs, args, device, amp_dtype)
    per_step = sum(v for v in calib.values() if isinstance(v, float))
    steps = args.steps
    if args.budget_s > 0 and per_step > 0:
        # ~3 s per run go to building, the first launches and the evaluation (measured on the H200)
        n_lr = len(args.lr)
        steps = max(1, min(steps, int((args.budget_s - RUN_OVERHEAD_S * len(runs) * n_lr) / (per_step * n_lr))))
    calib_s = time.perf_counter() - t_start
    print(f'calibration {calib_s:.1f}s; seconds/step: '
          + ', '.join(f'{n}@{w}={v if isinstance(v, str) else round(v, 4)}' for (n, w), v in calib.items())
          + f'; training every model for {steps} steps', flush=True)

    results = []
    for name, width in runs:
        if isinstance(calib[(name, width)], str):
            results.append({'model': name, 'width': width, 'steps': 0, 'error': calib[(name, width)]})
            continue
        # Zoology's protocol: every model gets the same learning-rate sweep and reports its best run
        tried = [train_one(name, width, steps, args, device, amp_dtype, lr) for lr in args.lr]
        ok = [r for r in tried if 'accuracy' in r]
        rec = max(ok, key=lambda r: sum(r['accuracy'].values())) if ok else tried[0]
        if len(tried) > 1:
            rec['lr_sweep'] = {r['lr']: r.get('accuracy', r.get('error')) for r in tried}
        results.append(rec)
        acc = rec.get('accuracy', rec.get('error'))
        print(f'{name} width {width}: {acc} at lr {rec["lr"]} ({rec.get("train_s", "-")} s)'
              + (f'; sweep {rec["lr_sweep"]}' if len(tried) > 1 else ''), flush=True)
        # a run stopped by an outer time limit still leaves what it measured (mqar.py --replot reads it)
        with open(os.path.join(args.out, 'mqar.partial.json'), 'w') as fh:
            json.dump({'args': vars(args), 'steps': steps, 'results': results}, fh, indent=1)

    setup = (f'MQAR, T={args.seq_len}, vocab {args.vocab}, {len(args.widths)} widths x {len(args.models)} models, '
             f'2 layers, head dim {args.head_dim}, batch {args.batch}, {steps} steps (pair counts in turn), '
             f'AdamW lr {"/".join(str(x) for x in args.lr)} (best per model) cosine, '
             f'bf16 autocast: {amp_dtype is not None}, device {device}')
    payload = {'setup': setup, 'args': vars(args), 'steps': steps, 'env': env_info(device),
               'calibration_s_per_step': {f'{n}@{w}': v for (n, w), v in calib.items()}, 'results': results,
               'total_s': round(time.perf_counter() - t_start, 1)}
    return report(results, args, setup, payload)


def report(results: List[Dict], args, setup: str, payload: Dict) -> int:
    headers = ['model', 'width', 'params', 'lr'] + [f'acc {n} pairs' for n in args.pairs] + ['train s']
    rows = []
    for r in results:
        accs = [f'{r["accuracy"][n]:.3f}' if 'accuracy' in r else r.get('error', '')[:40] for n in args.pairs]
        rows.append([r['model'], r['width'], f'{r.get("params", 0) / 1e6:.2f}M', r.get('lr', '-')] + accs
                    + [r.get('train_s', '-')])
    table = markdown_table(headers, rows)
    return finish(args.out, 'mqar', payload, setup, table, lambda png: plot(results, args, png))


def replot(paths: List[str], args) -> int:
    """Table, JSON and plot from the results of earlier runs (mqar.json or mqar.partial.json files; for a (model,
    width) measured twice the later file wins), e.g. a sweep finished in two device calls."""
    merged: Dict = {}
    for path in paths:
        with open(path) as fh:
            for r in json.load(fh)['results']:
                if 'accuracy' in r:   # JSON keys are strings
                    r['accuracy'] = {int(n): acc for n, acc in r['accuracy'].items()}
                merged[(r['model'], r['width'])] = r
    results = [merged[key] for key in sorted(merged, key=lambda k: (k[1], list(MODELS).index(k[0])))]
    args.widths = sorted({r['width'] for r in results})
    setup = f'MQAR results merged from {", ".join(os.path.basename(p) for p in paths)} (each file states its setup)'
    return report(results, args, setup, {'setup': setup, 'sources': paths, 'results': results})


if __name__ == '__main__':
    raise SystemExit(main())
