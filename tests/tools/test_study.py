"""The study's measures and decision rule on hand-made results: best lr, pooled SE, LR sensitivity, basin, verdicts."""

import math

import pytest

from tests.common.results import results_row
from wesar_composer.tools.experiments.cli import main
from wesar_composer.tools.experiments.grid import FULL, REFINE_ARMS, plan, refine_lrs
from wesar_composer.tools.experiments.study import (
    OD_VERDICT,
    best_lrs,
    decisions,
    pooled_variance,
    refined_decisions,
    render_study_tables,
    summarize,
    summarize_refined,
)
from wesar_composer.tools.experiments.tables import RESULTS_CSV, _append_row

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
    assert 'WeSaR helps: a lower loss (1(a)).' in helps[0] and 'at 3 of 3 depths' in helps[0] and 'growing' in helps[0]
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


def _refine_rows(shape, method, best_lr, centre, noise=(0.005, -0.005)):
    """Refinement runs of ``method`` around ``best_lr``: ``centre`` at the lower point, 0.1 higher at the other."""
    lrs = refine_lrs(method, best_lr)
    rows = _rows(shape, method, lrs, [centre, centre + 0.1], noise=noise)
    for r in rows:
        r['group'] = 'refine'
    return rows


def test_refine_plan_takes_the_lrs_beside_each_best():
    assert refine_lrs('small_rapid', 1e-2) == (0.00548, 0.0173)
    assert refine_lrs('small_rapid', 1e-1) == (0.0548,)  # the end of the sweep: one side
    with pytest.raises(ValueError, match='0.005.*not one of its study learning rates'):
        refine_lrs('small_rapid', 5e-3)
    rows = _study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0})
    best = best_lrs(rows)
    assert best[('base', 'small_rapid')] == 1e-2 and best[('base', 'wesar_width')] == 3e-3
    assert ('base', 'small_qkln') not in best  # not an arm of rules 1 to 3
    specs = [s for s in plan(FULL, ['refine'], best) if s.shape == 'base']
    assert {s.name for s in specs if s.method == 'wesar_width' and s.seed == 0} == {
        'refine-base-wesar_width-lr0.00173-s0',
        'refine-base-wesar_width-lr0.00548-s0',
    }
    assert len(specs) == len(REFINE_ARMS) * 2 * len(FULL.study_seeds)
    with pytest.raises(ValueError, match="needs the study's results"):
        plan(FULL, ['refine'], {})


def test_refine_of_a_missing_or_cut_study_is_refused_before_any_work(tmp_path, capsys):
    assert main(['--groups', 'refine', '--out', str(tmp_path / 'none')]) == 2
    assert 'needs the whole study' in capsys.readouterr().err
    assert not (tmp_path / 'none').exists()
    cut = tmp_path / 'cut'
    cut.mkdir()
    first = plan(FULL, ['study'])[0]
    row = results_row(first.method, first.seed, 4.0, group='study', shape=first.shape, lr=first.lr, run_name=first.name)
    _append_row(cut / RESULTS_CSV, row)
    before = (cut / RESULTS_CSV).read_text()
    assert main(['--groups', 'study', 'refine', '--out', str(cut)]) == 2
    assert f'{len(plan(FULL, ["study"])) - 1} of its planned runs are missing' in capsys.readouterr().err
    assert sorted(p.name for p in cut.iterdir()) == [RESULTS_CSV] and (cut / RESULTS_CSV).read_text() == before


def test_refined_rules_use_the_near_optimum_noise():
    # the study: every arm's sweep with its best at the middle lr; far seeds at the top lr inflate its SE
    rows = _study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0})
    for r in rows:
        if r['lr'] == max(LRS_SMALL) or (r['method'] in ('wesar_width', 'matrix_lr') and r['lr'] == max(LRS_SIGMA)):
            r['val_loss'] += 0.5 if r['seed'] == 0 else -0.5
    best = best_lrs(rows)
    for shape, n_gap in (('d64-L2', 0.03), ('base', 0.05), ('d64-L8', 0.08)):
        rows += _refine_rows(shape, 'small_rapid', best[(shape, 'small_rapid')], 3.99)
        rows += _refine_rows(shape, 'small_od_lr', best[(shape, 'small_od_lr')], 3.99 - n_gap)
        rows += _refine_rows(shape, 'wesar_width', best[(shape, 'wesar_width')], 3.98)
        rows += _refine_rows(shape, 'matrix_lr', best[(shape, 'matrix_lr')], 3.98)
    # the study's rule: SE from every point, 0.5-nat seed differences at the top lr included
    study_lines = decisions(summarize(rows))
    assert 'Not shown.' in study_lines[2]
    refined = summarize_refined(rows)
    small = refined[('base', 'small_rapid')]
    assert small.best == pytest.approx(3.99) and small.best_lr == 0.00548
    # pooled over the 12 near-optimum points, each with seeds +-0.005 or +-0.01
    assert small.se == pytest.approx(math.sqrt((8 * 0.00005 + 4 * 0.0002) / 12 / 2))
    lines = refined_decisions(refined)
    assert 'at 0 of 3 depths' in lines[0] and 'does not reach a lower loss' in lines[0]
    assert 'The gates add nothing beyond the learning rates.' in lines[1]
    assert 'more than 2 SE lower at 3 of 3 depths' in lines[2] and OD_VERDICT in lines[2]
    tables = render_study_tables(rows)
    assert tables['study-refined-decision'] == '\n'.join(lines)
    assert '0.00548: 3.990' in tables['study-refined']


def test_refined_rules_say_what_they_cannot_decide():
    rows = _study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0})
    best = best_lrs(rows)
    for shape in ('d64-L2', 'base', 'd64-L8'):
        for method in REFINE_ARMS:
            if (shape, method) not in (('d64-L8', 'matrix_lr'), ('base', 'small_od_lr')):  # the twin not at N 8
                rows += _refine_rows(shape, method, best[(shape, method)], 3.99)
    # runs around an earlier best (not beside the current one), and refinement runs that all diverged
    stray = _refine_rows('base', 'small_rapid', 1e-1, 2.0)
    diverged = _refine_rows('base', 'small_od_lr', best[('base', 'small_od_lr')], 3.0)
    for r in diverged:
        r['diverged'] = 1
    refined = summarize_refined(rows + stray + diverged)
    assert refined[('base', 'small_rapid')].best == pytest.approx(3.99)  # the stray 2.0 is left out
    assert 0.0548 not in refined[('base', 'small_rapid')].lrs
    od = refined[('base', 'small_od_lr')]  # the study's best point, its neighbours diverged
    assert (od.best_lr, od.best) == (1e-2, pytest.approx(4.0)) and sum(math.isnan(m) for m in od.means) == 2
    lines = refined_decisions(refined)
    assert 'Cannot be decided: no refined per-matrix-lr arm or SE at d 64, N 8.' in lines[1]
    assert 'd 64, N 8 not refined' in lines[1]
    one_seed = refined_decisions(summarize_refined([r for r in rows if r['seed'] == 0]))
    assert one_seed == ['No seed variance near the optimum (one seed): the rules cannot be applied.']


def test_refined_rule_1a_needs_wins_at_two_depths_and_a_growing_gap():
    def lines(gaps):
        rows = _study({'d64-L2': 0.0, 'base': 0.0, 'd64-L8': 0.0})
        best = best_lrs(rows)
        for shape, gap in gaps.items():
            rows += _refine_rows(shape, 'small_rapid', best[(shape, 'small_rapid')], 3.99)
            rows += _refine_rows(shape, 'wesar_width', best[(shape, 'wesar_width')], 3.99 - gap)
            rows += _refine_rows(shape, 'matrix_lr', best[(shape, 'matrix_lr')], 3.99)
        return refined_decisions(summarize_refined(rows))

    growing = lines({'d64-L2': 0.01, 'base': 0.05, 'd64-L8': 0.1})
    assert 'at 2 of 3 depths' in growing[0] and '**WeSaR reaches a lower loss.**' in growing[0]
    assert 'The gates differ from the learning rates.' in growing[1]
    shrinking = lines({'d64-L2': 0.1, 'base': 0.05, 'd64-L8': 0.03})
    assert 'not growing' in shrinking[0] and 'does not reach a lower loss' in shrinking[0]


def test_paired_twin_on_the_committed_results():
    from pathlib import Path

    from wesar_composer.tools.experiments.study import paired_twin
    from wesar_composer.tools.experiments.tables import read_results

    rows = read_results(Path(__file__).parents[2] / 'docs' / 'reproduction' / 'study' / RESULTS_CSV)
    pairs = paired_twin(rows)
    assert pairs is not None
    assert (pairs.at_optimum.n, pairs.at_optimum.lower) == (8, 6)
    assert pairs.at_optimum.mean == pytest.approx(-0.0130, abs=5e-5) and pairs.at_optimum.t < -3
    assert (pairs.everywhere.n, pairs.everywhere.lower) == (50, 47)
