"""benchmarks/ab.py: variant parsing, the environment switch and the per-round ratios (the timing itself needs a
GPU and runs through gpu_suite.sh's ab stage)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import ab  # noqa: E402


def test_variants_parse_with_or_without_the_prefix():
    assert ab.parse_variant('default') == {}
    assert ab.parse_variant('STATE_PAIR=1,GKA_TRITON_FAST_ITERS=17') == {'GKA_TRITON_STATE_PAIR': '1',
                                                                        'GKA_TRITON_FAST_ITERS': '17'}
    with pytest.raises(SystemExit, match='NAME=value'):
        ab.parse_variant('STATE_PAIR')


def test_switch_restores_the_environment(monkeypatch):
    monkeypatch.setenv('GKA_TRITON_FAST_ITERS', '5')
    monkeypatch.delenv('GKA_TRITON_STATE_PAIR', raising=False)
    with ab.Switch({'GKA_TRITON_FAST_ITERS': '17', 'GKA_TRITON_STATE_PAIR': '1'}):
        assert os.environ['GKA_TRITON_FAST_ITERS'] == '17' and os.environ['GKA_TRITON_STATE_PAIR'] == '1'
    assert os.environ['GKA_TRITON_FAST_ITERS'] == '5' and 'GKA_TRITON_STATE_PAIR' not in os.environ


def test_ratios_are_per_round_against_the_first_variant():
    rows = ab.summarise('case', ['a', 'b'], [[2.0, 4.0, 3.0], [1.0, 3.0, 3.3]])
    assert rows[0]['ratio'] == 1.0 and rows[0]['ms'] == 3.0
    # per-round ratios 0.5, 0.75, 1.1: the median and range of those, not the ratio of the medians (3.0 / 3.0)
    assert rows[1]['ratio'] == pytest.approx(0.75) and rows[1]['ratio_min'] == pytest.approx(0.5)
    assert rows[1]['ratio_max'] == pytest.approx(1.1)
    assert '| case | b | 3.000 | 0.750 | 0.500-1.100 | - |' in ab.markdown(rows)
    rows = ab.summarise('model', ['a', 'b'], [[2.0], [1.0]], mem_gib=[0.75, 0.5])
    assert rows[1]['act_gib'] == 0.5 and '| model | b | 1.000 | 0.500 | 0.500-0.500 | 0.50 |' in ab.markdown(rows)


def test_specs_carry_switches_and_refuse_traced_ones_under_compile():
    specs, variants = ab.parse_specs(['gka_small', 'gka_small@compile=default%GKA_COMPILE_CORE=1,FAST_ITERS=9',
                                      'gka_small%GKA_FUSED_GLUE=0'])
    assert specs == ['gka_small', 'gka_small@compile=default', 'gka_small']
    assert variants == [{}, {'GKA_COMPILE_CORE': '1', 'GKA_TRITON_FAST_ITERS': '9'}, {'GKA_FUSED_GLUE': '0'}]
    # read while dynamo traces: two compiled specs would share the first one's graphs
    with pytest.raises(SystemExit, match='GKA_FUSED_GLUE'):
        ab.parse_specs(['gka_small@compile=default', 'gka_small@compile=default%GKA_FUSED_GLUE=0'])
