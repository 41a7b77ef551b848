"""The study's measures and decision rule on hand-made results: best lr, pooled SE, LR sensitivity, basin, verdicts."""

import math

import pytest

from wesar_composer.tools.experiments.study import decisions, pooled_variance, summarize

LRS_SMALL = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LRS_SIGMA = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _rows(shape, method, lrs, losses, noise=(0.01, -0.01), spikes=None):
    rows = []
    for i, (lr, loss) in enumerate(zip(lrs, losses)):
        for seed, eps in enumerate(noise):
            rows.append(
                {
                    'group': 'study',
                    'shape': shape,
                    'method': method,
                    'lr': lr,
                    'seed': seed,
                    'val_loss': loss + eps,
                    'spikes': (spikes or {}).get(i, 0),
                    'diverged': 0,
                    'd_over_u_last': 1.0,
                    'max_attn_logit': 10.0 * (i + 1),
                }
            )
    return rows


def _study(wesar_gap, qkln_flat=True):
    """Small init's sweep at every depth; WeSaR lower at its best by wesar_gap[shape]; matrix_lr equal to WeSaR."""
    rows = []
    for shape in ('d64-L2', 'base', 'd64-L8'):
        small = [5.0, 4.4, 4.0, 4.3, 5.5]
        rows += _rows(shape, 'small_rapid', LRS_SMALL, small)
        wesar = [x - wesar_gap[shape] for x in (5.0, 4.4, 4.0, 4.3, 5.5)]
        rows += _rows(shape, 'wesar_width', LRS_SIGMA, wesar)
        rows += _rows(shape, 'matrix_lr', LRS_SIGMA, wesar)
        rows += _rows(shape, 'small_od_lr', LRS_SMALL, small)
        qkln = [5.0, 4.4, 4.0, 4.05, 4.08] if qkln_flat else small
        rows += _rows(shape, 'small_qkln', LRS_SMALL, qkln)
    return rows


def test_measures():
    rows = _rows('base', 'small_rapid', LRS_SMALL, [5.0, 4.4, 4.0, 4.3, 8.0], noise=(0.02, -0.02, 0.0))
    rows += _rows('base', 'wesar_width', LRS_SIGMA, [5.0, 4.05, 4.0, 4.08, 4.5], noise=(0.0, 0.0, 0.0), spikes={4: 1})
    s = summarize(rows)
    small, wesar = s[('base', 'small_rapid')], s[('base', 'wesar_width')]
    # pooled over the 10 non-spiking points: 5 with variance 0.02^2 (seeds +-0.02, 0), 4 with 0
    assert pooled_variance(rows, 'base') == pytest.approx(5 * 0.0004 / 9)
    assert small.best_lr == 1e-2 and small.best == pytest.approx(4.0)
    assert small.se == pytest.approx(math.sqrt(5 * 0.0004 / 9 / 3))
    l0 = math.log(1024)  # losses above ln(vocab) are capped there
    assert small.sensitivity == pytest.approx((1.0 + 0.4 + 0 + 0.3 + (l0 - 4.0)) / 5)
    assert (small.basin, small.basin_at_edge) == (1, False)
    assert (wesar.basin, wesar.spiked_runs, wesar.runs) == (3, 3, 15)
    assert wesar.max_logit_best == pytest.approx(30.0) and wesar.max_logit_top == pytest.approx(50.0)


def test_decision_rule_follows_the_numbers():
    helps = decisions(summarize(_study({'d64-L2': 0.05, 'base': 0.1, 'd64-L8': 0.2})))
    assert 'WeSaR helps.' in helps[0] and 'at 3 of 3 depths' in helps[0] and 'growing' in helps[0]
    assert 'The gates add nothing beyond the learning rates.' in helps[1]
    assert 'Not shown.' in helps[2]
    assert 'The control passes' in helps[3]
    none = decisions(summarize(_study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0}, qkln_flat=False)))
    assert 'No evidence that WeSaR helps at this scale.' in none[0]
    assert 'The control fails' in none[3]
    # a gap that shrinks with depth is not enough, even where each depth is significant
    shrinking = decisions(summarize(_study({'d64-L2': 0.2, 'base': 0.1, 'd64-L8': 0.05})))
    assert 'not growing' in shrinking[0] and 'No evidence' in shrinking[0]


def test_no_verdict_without_a_standard_error():
    one_seed = [r for r in _study({'d64-L2': 0.3, 'base': 0.3, 'd64-L8': 0.3}) if r['seed'] == 0]
    lines = decisions(summarize(one_seed))
    assert lines == [lines[0]] and 'the rule cannot be applied' in lines[0]


def test_a_shape_without_a_second_seed_borrows_the_pooled_variance():
    rows = [r for r in _study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0}) if r['shape'] != 'd64-L8' or r['seed'] == 0]
    s = summarize(rows)
    everywhere = pooled_variance(rows, None)
    assert everywhere == pytest.approx(0.0002)  # seeds +-0.01 at every point of the two other shapes
    assert s[('d64-L8', 'small_rapid')].se_borrowed and not s[('base', 'small_rapid')].se_borrowed
    assert s[('d64-L8', 'small_rapid')].se == pytest.approx(math.sqrt(everywhere / 1))
    assert s[('base', 'small_rapid')].se == pytest.approx(math.sqrt(everywhere / 2))
