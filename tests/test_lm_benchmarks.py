"""The language-model benchmarks' own pieces: the MQAR task generator, the attention baseline's KV cache, and CPU
smoke runs of both scripts (so they cannot rot between GPU runs)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from gka_inputs import rel_rmse
from gka_vision.lm import GKAConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))

import decode  # noqa: E402
import mqar  # noqa: E402
from lm_common import AttnLayerCache, build_lm, decode_step  # noqa: E402


@pytest.mark.parametrize('seq_len,pairs,vocab', [(64, 8, 64), (256, 64, 256), (255, 64, 8192)])
def test_mqar_batch_is_multi_query_recall(seq_len, pairs, vocab):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    inputs, labels = mqar.mqar_batch(3, seq_len, pairs, vocab, 0.01, g, torch.device('cpu'))
    assert inputs.shape == labels.shape == (3, seq_len)
    half = vocab // 2
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and bool((keys >= 1).all()) and bool((keys < half).all())
        assert bool((values >= half).all()) and bool((values < vocab).all())
        pos = torch.nonzero(y != mqar.IGNORE_INDEX)[:, 0]
        assert len(pos) == pairs and bool((pos >= 2 * pairs).all())  # only queries are scored
        table = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(x[pos].tolist()) == sorted(table)  # every key is asked exactly once
        for p in pos.tolist():
            assert int(y[p]) == table[int(x[p])]  # the target is the value stored with that key
            if p + 1 < seq_len:
                assert int(x[p + 1]) == int(y[p])  # and it follows the query in the sequence
        rest = torch.ones(seq_len, dtype=torch.bool)
        rest[:2 * pairs] = False
        rest[pos] = False
        rest[(pos + 1).clamp_max(seq_len - 1)] = False
        assert bool((x[rest] == 0).all())  # everything else is filler


def test_mqar_batch_rejects_impossible_settings():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match='too short'):
        mqar.mqar_batch(1, 100, 32, 256, 0.01, g, torch.device('cpu'))
    with pytest.raises(ValueError, match='too small'):
        mqar.mqar_batch(1, 256, 64, 64, 0.01, g, torch.device('cpu'))


@pytest.mark.parametrize('static', [False, True])
def test_attention_baseline_cache_decode_equals_full_forward(static):
    cfg = GKAConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=2)
    model = build_lm('attention', cfg).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        caches = [AttnLayerCache.allocate(2, cfg.kv_heads, 32, cfg.head_dim, 0, 'cpu', torch.float32,
                                          random_fill=False, static=static) for _ in range(cfg.num_layers)]
        out = []
        for t in range(ids.shape[1]):
            logits, caches = decode_step(model, ids[:, t:t + 1], caches)
            out.append(logits)
    assert rel_rmse(torch.stack(out, 1), full) <= 1e-5


def test_benchmark_scripts_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv('GKA_BACKEND', 'torch')
    monkeypatch.setenv('GKA_CHECK_VALUES', '1')  # the scripts switch the value check off; restored at teardown
    assert decode.main(['--quick', '--contexts', '32', '64', '--batch', '1', '--out', str(tmp_path / 'd')]) == 0
    res = json.loads((tmp_path / 'd' / 'decode.json').read_text())
    assert {r['kind'] for r in res['results']} == {'gka', 'attention'}
    assert all('ms_per_token' in r for r in res['results']), res['results']
    assert mqar.main(['--quick', '--widths', '32', '--steps', '3', '--out', str(tmp_path / 'm')]) == 0
    res = json.loads((tmp_path / 'm' / 'mqar.json').read_text())
    assert len(res['results']) == 3 and all('accuracy' in r for r in res['results']), res['results']
    assert (tmp_path / 'm' / 'mqar.md').read_text().count('\n') >= 5
    # a learning-rate sweep keeps each model's best run (Zoology's protocol)
    assert mqar.main(['--quick', '--widths', '32', '--steps', '3', '--lr', '1e-3', '3e-2', '--models', 'Attention',
                      '--out', str(tmp_path / 's')]) == 0
    (swept,) = json.loads((tmp_path / 's' / 'mqar.json').read_text())['results']
    assert set(swept['lr_sweep']) == {'0.001', '0.03'}
    best = max(swept['lr_sweep'].items(), key=lambda kv: sum(kv[1].values()))
    assert float(best[0]) == swept['lr']
    # every finished model is on disk before the sweep ends; --replot merges runs (the later file wins)
    partial = json.loads((tmp_path / 'm' / 'mqar.partial.json').read_text())
    assert len(partial['results']) == 3
    first = res['results'][0]
    first['accuracy'] = {n: 0.5 for n in first['accuracy']}
    (tmp_path / 'later.json').write_text(json.dumps({'results': [first]}))
    assert mqar.main(['--quick', '--replot', str(tmp_path / 'm' / 'mqar.json'), str(tmp_path / 'later.json'),
                      '--out', str(tmp_path / 'r')]) == 0
    merged = json.loads((tmp_path / 'r' / 'mqar.json').read_text())['results']
    assert len(merged) == 3 and [r['accuracy'] for r in merged if r['model'] == first['model']] == [
        {'4': 0.5, '8': 0.5}]
