"""The ablation on hand-made results: its plan, extension rule, paired statistics and every verdict."""

import math
import random

import pytest

from wesar_composer.tools.experiments.ablation import ablation_decisions, render_ablation_tables, summarize_ablation
from wesar_composer.tools.experiments.grid import (
    ABLATION_ARMS,
    ABLATION_SHAPES,
    FULL,
    SHAPES,
    RunSpec,
    ablation_extension,
    ablation_k,
    ablation_lr,
    ablation_points,
    plan,
)
from wesar_composer.tools.experiments.measures import Paired, basin, sensitivity

SEEDS = (0, 1, 2)
NOISE = {0: 0.006, 1: -0.004, 2: -0.002}  # a seed effect shared by every arm: it cancels in a pair


def _curve(k, best_k, best):
    return best + 0.08 * (k - best_k) ** 2


def _arm(shape, method, best_k=-3, best=4.0, seeds=SEEDS, ks=range(-5, 1), jitter=None, curve=None):
    rows = []
    for k in ks:
        for seed in seeds:
            loss = (curve or _curve)(k, best_k, best) + NOISE[seed] + (jitter or {}).get(seed, 0.0)
            rows.append(
                {
                    'group': 'ablation',
                    'method': method,
                    'shape': shape,
                    'd_model': SHAPES[shape]['d_model'],
                    'lr': ablation_lr(method, SHAPES[shape]['d_model'], k),
                    'seed': seed,
                    'val_loss': loss,
                    'diverged': 0,
                    'spikes': 0,
                    'max_attn_logit': 20.0 + k,
                }
            )
    return rows


def _ablation(offsets=None, jitter=None, **arm_kwargs):
    """Every arm at every shape, best 4.0 at k -3, shifted by offsets[method] (per shape if a dict)."""
    rows = []
    for shape in ABLATION_SHAPES:
        for method in ABLATION_ARMS:
            off = (offsets or {}).get(method, 0.0)
            off = off[shape] if isinstance(off, dict) else off
            rows += _arm(shape, method, best=4.0 + off, jitter=(jitter or {}).get(method), **arm_kwargs.get(method, {}))
    return rows


def _line(lines, question):
    return next(line for line in lines if question in line)


def test_plan_near_points_at_every_seed_and_far_ones_at_the_first():
    specs = plan(FULL, ['ablation'])
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 294  # 7 arms x 3 shapes x (4 near x 3 seeds + 2 far)
    assert {s.shape for s in specs} == set(ABLATION_SHAPES) and SHAPES['d64-L16']['n_layers'] == 16
    near, far = ablation_points('small_rapid')
    assert (near, far) == ((-5, -4, -3, -2), (-1, 0))  # two past the expected optimum -4, and two beyond
    first_far = next(
        i for i, s in enumerate(specs) if s.lr == ablation_lr(s.method, 64, ablation_points(s.method)[1][0])
    )
    # every seed of the expected best and its neighbours first, then seed 0 further out (the sweep the
    # basins need), then seeds 1 and 2 of the second point above: a deadline cuts those first
    assert [s.seed for s in specs[:first_far]].count(2) == 7 * 3 * 3
    assert all(s.seed == 0 for s in specs[first_far : 7 * 3 * (9 + 3)])
    assert {s.seed for s in specs[7 * 3 * (9 + 3) :]} == {1, 2}
    # ablation_k inverts ablation_lr despite its 3-digit rounding
    assert all(
        ablation_k(m, d, ablation_lr(m, d, k)) == k for m in ABLATION_ARMS for d in (64, 128) for k in range(-8, 3)
    )
    # equal points are equal relative steps: the same lr / sigma for Small init and WeSaR
    assert ablation_lr('small_rapid', 64, -3) / math.sqrt(2 / 320) == pytest.approx(10**-0.75, rel=1e-2)
    assert ablation_lr('wesar_width', 64, -3) / math.sqrt(0.081 / 64) == pytest.approx(10**-0.75, rel=1e-2)


def test_extension_adds_points_past_an_edge_best_and_seeds_at_a_far_best():
    rows = _arm('base', 'small_rapid', best_k=0, seeds=(0,))  # best at the top of the grid
    added = {(round(4 * math.log10(s.lr / math.sqrt(2 / 320))), s.seed) for s in ablation_extension(rows, FULL, SHAPES)}
    assert {(1, 0), (2, 0), (-1, 1), (0, 2)} <= added
    assert not any(k > 2 for k, _ in added)  # the limit
    # a complete plan with the best where expected adds nothing new
    done = _arm('base', 'small_rapid', best_k=-4, ks=ablation_points('small_rapid')[0])
    names = {s.name for s in plan(FULL, ['ablation'])}
    assert all(s.name in names for s in ablation_extension(done, FULL, SHAPES))


def test_plan_orders_runs_by_distance_from_each_arms_best_so_far():
    # seed 0 done with Small init's best at k -1, two points above where it was expected (-4)
    done = _arm('base', 'small_rapid', best_k=-1, seeds=(0,))
    names = {RunSpec('ablation', r['method'], r['shape'], r['seed'], r['lr']).name for r in done}
    todo = [s for s in plan(FULL, ['ablation'], ablation_rows=done) if s.name not in names]
    arm = [s for s in todo if s.shape == 'base' and s.method == 'small_rapid']
    ks = [ablation_k(s.method, 64, s.lr) for s in arm]
    distances = [abs(k - -1) for k in ks]
    assert distances == sorted(distances)  # a deadline cuts the points far from the best first
    assert ks[:2] == [-1, -1] and {s.seed for s in arm[:2]} == {1, 2}
    assert max(distances[:6]) == 1 and min(distances[6:]) == 2
    # an arm without results is ordered around its expected optimum
    other = [s for s in todo if s.shape == 'base' and s.method == 'wesar_width']
    k_other = [ablation_k(s.method, 64, s.lr) for s in other]
    assert k_other[:3] == [-3, -3, -3]


def test_paired_statistics_and_each_verdict():
    assert Paired([-0.02, -0.021, -0.019, -0.02]).verdict(0.01, 'A', 'B') == 'A reaches a lower loss than B.'
    assert Paired([0.02, 0.021, 0.019]).verdict(0.01, 'A', 'B') == 'A reaches a higher loss than B.'
    assert (
        Paired([0.001, -0.001, 0.0005, -0.0005]).verdict(0.01, 'A', 'B') == 'A and B are equivalent within ±0.01 nats.'
    )
    small = Paired([-0.003, -0.0031, -0.0029, -0.003])
    assert small.verdict(0.01, 'A', 'B') == 'A is lower than B, by less than the 0.01-nat margin.'
    wide = Paired([0.03, -0.03, 0.01])
    assert wide.verdict(0.01, 'A', 'B').startswith('Cannot decide: neither')
    assert Paired([0.1, 0.1]).verdict(0.01, 'A', 'B') == 'Cannot decide: 2 pairs (3 needed).'
    p = Paired([-0.01, -0.02, -0.03])
    assert (p.mean, p.se, p.lower) == (pytest.approx(-0.02), pytest.approx(0.01 / math.sqrt(3)), 3)
    assert p.interval(0.975)[1] == pytest.approx(-0.02 + 4.303 * 0.01 / math.sqrt(3))


def test_basin_and_sensitivity_interpolate_on_log_lr():
    xs, ys = [0.0, 1.0, 2.0], [4.2, 4.0, 4.2]
    assert basin(xs, ys, 0.1) == (pytest.approx(1.0), False)  # crossings halfway each side
    assert basin(xs, [4.0, 4.05, 4.3], 0.1) == (pytest.approx(1.2), True)  # reaches the left end
    assert basin(xs, ys, 0.1, span=(0.75, 2.0))[0] == pytest.approx(0.75)
    assert sensitivity(xs, ys, cap=10.0) == pytest.approx(0.1)
    assert sensitivity(xs, [4.0, 4.0, 20.0], cap=5.0) == pytest.approx(0.25)


def test_rule_reads_gates_and_clipping_apart():
    # the trained gates 0.02 lower than fixed (noise 0.001 per seed); the clip: fixed 0.015 below the twin,
    # equal to the matched twin; Small init 0.05 higher than WeSaR; the Small backbone equal to He
    rng = random.Random(0)
    jitter = {m: {s: rng.uniform(-0.002, 0.002) for s in SEEDS} for m in ABLATION_ARMS}
    offsets = {
        'wesar_width': -0.02,
        'matrix_lr': 0.015,
        'small_rapid': 0.03,
        'wesar_width_small': -0.02,
        'small_od_lr': -0.02,
    }
    lines = ablation_decisions(summarize_ablation(_ablation(offsets, jitter)))
    assert 'WeSaR reaches a lower loss than WeSaR (fixed gates).' in _line(lines, 'Trained against fixed')
    assert 'WeSaR (fixed gates) reaches a lower loss than the twin.' in _line(lines, 'Clipping:')
    assert 'equivalent within ±0.01 nats' in _line(lines, 'Matched clipping')
    assert 'WeSaR reaches a lower loss than the twin.' in _line(lines, 'WeSaR against the twin')
    vs_small = _line(lines, 'WeSaR against Small init')
    assert 'WeSaR reaches a lower loss than Small init.' in vs_small and 'no change with depth' in vs_small
    assert 'by less than the 0.01-nat margin' in _line(lines, 'Backbone')  # significant, but inside the margin
    assert 'No difference the grid separates.' in _line(lines, 'Basin of WeSaR (d')


def test_rule_says_cannot_decide():
    # seed-to-seed differences of 0.03 between arms: neither different nor equivalent
    jitter = {'wesar_width': {0: 0.03, 1: -0.03, 2: 0.0}}
    lines = ablation_decisions(summarize_ablation(_ablation(jitter=jitter)))
    assert 'Cannot decide: neither different from 0 nor within ±0.01 nats.' in _line(lines, 'Trained against fixed')
    # one seed at one depth: too few pairs; identical pairs: no SE
    one = [r for r in _ablation() if r['seed'] == 0 and r['shape'] == 'base']
    assert 'Cannot decide: 1 pairs (3 needed).' in _line(ablation_decisions(summarize_ablation(one)), 'Trained')
    same = [r for r in _ablation() if r['seed'] == 0]
    assert 'Cannot decide: the pairs do not vary' in _line(ablation_decisions(summarize_ablation(same)), 'Trained')
    # an arm whose basin reaches the end of the common range at every depth
    flat = _ablation(wesar_width={'curve': lambda k, b, best: best + 0.001 * abs(k - b)})
    assert 'Cannot decide: the basin reaches the end' in _line(
        ablation_decisions(summarize_ablation(flat)), 'Basin of WeSaR (d'
    )


def test_depth_trend_and_basins_decided():
    gap = {'base': 0.0, 'd64-L8': 0.03, 'd64-L16': 0.06}  # Small init falls behind with depth
    wide = {'curve': lambda k, b, best: best + 0.04 * (k - b) ** 2}
    lines = ablation_decisions(summarize_ablation(_ablation({'small_rapid': gap}, wesar_width=wide)))
    assert "grows in WeSaR's favour with depth" in _line(lines, 'WeSaR against Small init')
    assert 'Wider than Small init at 3 of 3 depths.' in _line(lines, 'Basin of WeSaR (d')
    narrow = {'curve': lambda k, b, best: best + 0.3 * (k - b) ** 2}
    lines = ablation_decisions(summarize_ablation(_ablation(wesar_width=narrow)))
    assert 'Narrower than Small init at 3 of 3 depths.' in _line(lines, 'Basin of WeSaR (d')


def test_tables_render_from_results():
    tables = render_ablation_tables(_ablation())
    assert set(tables) == {'ablation-decision', 'ablation-arms', 'ablation-sweep'}
    assert '| d 64, N 16 | WeSaR, sigma^2 = 0.081/d, fixed gates | 0.178 |' in tables['ablation-arms']
    assert '**4.000 (3)**' in tables['ablation-sweep']
    assert render_ablation_tables([]) == {}
