"""benchmarks/models.py without a GPU: completing a budget-cut GPU run from an earlier one (--replot --merge)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import models as mb  # noqa: E402


def _kernels_bench():
    """benchmarks/kernels.py, loaded from its path: ``import kernels`` may find the repository's kernels/ package
    (the source of gka_kernels) first, depending on what pytest put on sys.path before."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gka_bench_kernels', os.path.join(ROOT, 'benchmarks', 'kernels.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(model, size, mode, img_s, act=1.0, **kw):
    return dict(model=model, img_size=size, batch=1, mode=mode, img_s=img_s, act_gib=act, ms=1e3 / img_s, **kw)


def test_merge_fills_unmeasured_cells_and_keeps_ratios_within_one_run(tmp_path):
    env = dict(device='test GPU', torch='2.x')
    main = [_row('gka_small', 224, 'infer', 100.0), _row('deit_small_patch16_224', 224, 'infer', 400.0),
            dict(model='gka_small', img_size=512, batch=1, mode='infer', skipped='time budget')]
    early = [_row('gka_small', 512, 'infer', 30.0, act=2.0), _row('deit_small_patch16_224', 512, 'infer', 60.0),
             _row('gka_small', 224, 'infer', 90.0), _row('deit_small_patch16_224', 224, 'infer', 300.0)]
    for name, rows in (('main', main), ('early', early)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'models.json').write_text(json.dumps(dict(env=env, rows=rows)))
    out = tmp_path / 'out'
    mb.main(['--replot', '--merge', str(tmp_path / 'main' / 'models.json'), str(tmp_path / 'early' / 'models.json'),
             '--out', str(out), '--modes', 'infer'])
    md = (out / 'models.md').read_text()
    # this run's 224-px cell, the earlier run's 512-px cell (marked), no 'not run' left
    assert '| gka_small | 100.0 (1.00) | 30.0 (2.00)† |' in md and 'not run' not in md
    assert '† measured in an earlier run: early' in md
    # ratios from one run each: 100 / 400 at 224 px (not 100 / 300), 30 / 60 at 512 px
    assert '| gka_small | 0.25× / mem 1.00× | 0.50× / mem 2.00× |' in md
    assert (out / 'models_infer.png').stat().st_size > 0


def test_results_record_the_code_and_switches(monkeypatch):
    """Benchmark outputs name the code (source digest, commit when there is a .git) and the GKA_* switches set."""
    import provenance
    monkeypatch.setenv('GKA_TRITON_TAIL', '1')
    p = provenance.provenance()
    assert len(p['source_digest']) == 12 and int(p['source_digest'], 16) >= 0
    assert p['switches']['GKA_TRITON_TAIL'] == '1'
    # a bare hash only when the package sources are the committed ones: a copied tree may carry an older .git
    assert p['commit'] == 'unknown' or len(p['commit'].removesuffix('+dirty')) == 12
    if p['commit'] != 'unknown':
        changed = subprocess.run(['git', 'status', '--porcelain', '--', 'kernels', 'gka_vision'], cwd=provenance.ROOT,
                                 capture_output=True, text=True).stdout.strip()
        assert p['commit'].endswith('+dirty') == bool(changed)


def test_model_specs_pass_arguments_to_timm():
    """name@key=value builds the registered model with other arguments (decision data: e.g. fewer iterations)."""
    assert mb.model_spec('gka_small') == ('gka_small', {})
    assert mb.model_spec('gka_small@num_iter=10,ridge_ratio=0.05') == ('gka_small', dict(num_iter=10, ridge_ratio=0.05))
    model = mb.build('gka_tiny@num_iter=3,depth=1', 32, 'cpu')
    assert len(model.blocks) == 1 and model.blocks[0].mixer.num_iter == 3
    # compile=MODE is a torch.compile mode, not a model argument
    assert mb.model_spec('gka_small@compile=reduce-overhead,num_iter=10') == (
        'gka_small', {'compile': 'reduce-overhead', 'num_iter': 10})
    compiled = mb.build('gka_tiny@depth=1,compile=default', 32, 'cpu')
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and len(compiled._orig_mod.blocks) == 1
    for bad in ('gka_small@num_iter', 'gka_small@num_iter=ten', 'gka_small@1x=2'):
        with pytest.raises(SystemExit, match='model spec'):
            mb.model_spec(bad)


def test_kernels_per_kernel_split_fits_each_kernel():
    """benchmarks/kernels.py --kernel-split: each kernel's ms per step and fixed ms, a kernel absent at some N
    counted as 0 there, largest default time first, and the markdown lists every kernel."""
    kb = _kernels_bench()
    per_n = {n: {'_solve': 0.2 + 0.03 * n, '_bwd': 1.5 + 0.05 * n, 'copy': 0.1} for n in (10, 20, 30)}
    per_n[10].pop('copy')
    default = {'_solve': 0.9, '_bwd': 2.5, 'copy': 0.1}
    ks = kb.per_kernel_split(per_n, default)
    assert [k['kernel'] for k in ks] == ['_bwd', '_solve', 'copy']
    assert ks[0]['ms_per_step'] == pytest.approx(0.05) and ks[0]['fixed_ms'] == pytest.approx(1.5)
    assert ks[1]['ms_per_step'] == pytest.approx(0.03) and ks[1]['fixed_ms'] == pytest.approx(0.2)
    assert ks[2]['ms_by_n'][10] == 0.0 and ks[2]['ms_per_step'] == pytest.approx(0.005)
    md = kb.kernel_split_markdown([dict(shape='B1 T2 H3 D64', kernels=ks, total_default_ms=3.5,
                                        total_fixed_ms=sum(k['fixed_ms'] for k in ks))])
    assert all(f'| {name} |' in md for name in ('_bwd', '_solve', 'copy'))


def test_kernels_iteration_split_separates_step_cost_from_fixed_cost():
    """benchmarks/kernels.py --iter-split: slope and intercept of the forward and of the backward (fwd+bwd minus
    fwd) over num_iter, and the step's product rate, on made-up times with a known answer."""
    kb = _kernels_bench()
    fwd = {10: 1.0 + 10 * 0.05, 20: 1.0 + 20 * 0.05, 30: 1.0 + 30 * 0.05}
    fb = {n: fwd[n] + 2.0 + n * 0.1 for n in fwd}   # backward: 2 ms fixed, 0.1 ms per step
    out = kb.iteration_split(fwd, fb, tokens=1000, D=64, fwd_chunk=64)
    assert out['fwd_ms_per_step'] == pytest.approx(0.05) and out['fwd_fixed_ms'] == pytest.approx(1.0)
    assert out['bwd_ms_per_step'] == pytest.approx(0.1) and out['bwd_fixed_ms'] == pytest.approx(2.0)
    assert out['bwd_over_fwd_per_step'] == pytest.approx(2.0)
    # forward step: 2 · (2·64² + 4·64·64) FLOP per token-head, 1000 token-heads, in 0.05 ms
    assert out['fwd_step_tflops'] == pytest.approx(2 * (2 * 64 * 64 + 4 * 64 * 64) * 1000 / 0.05e-3 / 1e12)


def test_kernels_table_has_fla_columns_and_blanks_what_was_not_measured():
    """benchmarks/kernels.py's markdown: every row has one cell per header column; fla's fwd and fwd+bwd times are
    their own columns (kernels.py records both where fla is installed), and a time that was not measured (fla
    missing, an OOM) reads '-'."""
    kb = _kernels_bench()
    rows = [dict(shape='B1 T2 H3 D64', gka_fwd_ms=1.5, gka_fwdbwd_ms=5.0, sdpa_fwd_ms=0.1, sdpa_fwdbwd_ms=0.4,
                 fla_simple_gla_fwd_ms=0.16, fla_simple_gla_fwdbwd_ms=1.34, ratio_fwd=15.0, ratio_fwdbwd=12.5,
                 target='fwd+bwd / sdpa fwd+bwd <= 3.9', target_met=False),
            dict(shape='B1 T4 H3 D64', gka_fwd_ms=2.0, gka_fwdbwd_ms=None, sdpa_fwd_ms=0.2, sdpa_fwdbwd_ms=0.5)]
    lines = kb.markdown(rows).splitlines()
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    assert head[5:7] == ['fla GLA fwd ms', 'fla GLA fwd+bwd ms']
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    assert all(len(c) == len(head) for c in cells) and len(lines[1].strip('|').split('|')) == len(head)
    assert cells[0][5:7] == ['0.160', '1.340'] and cells[0][-1] == 'no'
    assert cells[1][2] == '-' and cells[1][5:7] == ['-', '-'] and cells[1][-1] == ''
