"""wesar-experiments: the quick grid end to end through llm-foundry, and the page's generated tables."""

from __future__ import annotations

import math

import pytest

from tests.common.results import results_row
from wesar_composer.tools import experiments as ex
from wesar_composer.tools.experiments import tables

PAGE = """# Reproduction

Prose stays.

<!-- BEGIN GENERATED main-base -->
old table
<!-- END GENERATED main-base -->

<!-- BEGIN GENERATED lr -->
<!-- END GENERATED lr -->

<!-- BEGIN GENERATED unknown -->
kept as is
<!-- END GENERATED unknown -->
"""


def test_plan_covers_the_issue_grid_most_informative_first():
    specs = ex.plan(ex.FULL)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    main = [s for s in specs if s.group == 'main']
    assert len(main) == len(ex.MAIN_METHODS) * len(ex.FULL.shapes) * len(ex.FULL.seeds)
    assert {s.shape for s in main} == {'base', 'deep'}
    assert ex.SHAPES['deep']['n_layers'] > ex.SHAPES['base']['n_layers']
    assert ex.SHAPES['deep']['d_model'] < ex.SHAPES['base']['d_model']
    # the third seed comes last, so a deadline cuts seeds before it cuts the lr sweep or Table 6
    assert [s.seed for s in specs[-len(ex.MAIN_METHODS) * 2 :]] == [2] * len(ex.MAIN_METHODS) * 2
    lr = [s for s in specs if s.group == 'lr']
    assert {s.method for s in lr} == {'small_rapid', 'wesar'} and (min(s.lr for s in lr), max(s.lr for s in lr)) == (
        3e-4,
        3e-2,
    )
    monitored = {(s.method, s.shape) for s in specs if s.monitor}
    assert monitored == {(m, sh) for m in ('small_rapid', 'wesar') for sh in ('base', 'deep')}


def test_settings_keep_the_paper_ratios():
    rapid = ex.run_settings(ex.RunSpec('main', 'small_rapid', 'base', 0, 1e-3), ex.FULL)
    stable = ex.run_settings(ex.RunSpec('main', 'small_stable', 'base', 0, 5e-4), ex.FULL)
    assert stable['batch'] == 4 * rapid['batch'] and stable['tokens'] == rapid['tokens']
    assert (rapid['lr'], stable['lr']) == (1e-3, 5e-4)
    assert stable['warmup'] / stable['steps'] == pytest.approx(2000 / 7153, abs=0.05)


def test_config_takes_the_method_part_and_the_shape(tmp_path):
    spec = ex.RunSpec('main', 'wesar_fixed', 'deep', 1, 1e-3, monitor=False)
    from omegaconf import OmegaConf as om

    cfg = ex.build_config(spec, ex.FULL, ex.SHAPES, '/data', '/mlruns', tmp_path)
    resolved = om.to_container(om.merge(cfg, {'variables': {'method': spec.method}}), resolve=True)
    assert resolved['algorithms']['wesar']['trainable_gates'] is False
    assert set(resolved['algorithms']) == {'gradient_clipping', 'z_loss', 'wesar'}
    assert resolved['model']['n_layers'] == ex.SHAPES['deep']['n_layers']
    assert resolved['seed'] == 1 and resolved['run_name'] == spec.name
    assert resolved['optimizer']['weight_decay'] == pytest.approx(1e-5)
    assert 'update_ratio_monitor' not in resolved['callbacks'] and resolved['loggers'] == {}


def test_study_plan_and_arm_configs(tmp_path):
    """Every study arm at every study shape over its five half-decades, two seeds; the literal sigma^2 at the first
    shape only; each arm's algorithms from the width (sigma^2 = 0.081 / d, Small's 2 / (5d)) and qk-LayerNorm."""
    from omegaconf import OmegaConf as om

    study = ex.plan(ex.FULL, ['study'])
    assert len(study) == len({s.name for s in study}) == 2 * (4 * 5 * 5 + 5)
    assert {s.method for s in study if s.shape == 'base'} == {*ex.STUDY_ARMS, 'wesar'}
    assert 'wesar' not in {s.method for s in study if s.shape != 'base'}
    assert [s.shape for s in study[-5:]] == ['d128-L4'] * 5  # a deadline cuts the second width first

    def algorithms(method, shape='d64-L8'):
        spec = ex.RunSpec('study', method, shape, 0, 1e-2)
        cfg = ex.build_config(spec, ex.FULL, ex.SHAPES, '/data', '/mlruns', tmp_path)
        resolved = om.to_container(om.merge(cfg, {'variables': {'method': method}}), resolve=True)
        return resolved['algorithms'], resolved['model']

    algs, model = algorithms('wesar_width', 'd128-L4')
    assert algs['wesar']['sigma_squared'] == pytest.approx(0.081 / 128) and algs['wesar']['trainable_gates']
    algs, _ = algorithms('matrix_lr')
    assert algs['paper_init'] == {'backbone': 'he', 'embedding_scaling': True, 'matrix_lr_sigma_squared': 0.081 / 64}
    algs, _ = algorithms('small_od_lr')
    assert algs['paper_init']['matrix_lr_sigma_squared'] == pytest.approx(2 / (5 * 64))
    algs, model = algorithms('small_qkln')
    assert algs['paper_init']['backbone'] == 'small' and model['attn_config']['qk_ln'] is True
    assert algorithms('small_rapid')[1]['attn_config'].get('qk_ln', False) is False


def test_diverged_rule():
    assert ex.diverged(float('nan'), [5.0, 4.0])
    assert ex.diverged(4.0, [5.0, None, 4.0])
    assert ex.diverged(6.0, [5.0] + [5.5] * 10)
    assert not ex.diverged(4.0, [5.0] + [4.0] * 10)


@pytest.mark.slow
def test_quick_grid_writes_results_figures_and_page(tiny_mds, tmp_path, capsys):
    out = tmp_path / 'repro'
    page = tmp_path / 'page.md'
    page.write_text(PAGE)
    assert (ex.QUICK.vocab_size, ex.QUICK.seq_len) == (tiny_mds.vocab_size, tiny_mds.seq_len)
    rc = ex.main(['--quick', '--out', str(out), '--data-dir', str(tiny_mds.root), '--page', str(page)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert '[wesar-demo]' not in printed  # progress lines carry the command's own tag and the run's name
    first = ex.plan(ex.QUICK)[0].name
    assert f'[wesar-experiments] {first}: batch {ex.QUICK.steps}/{ex.QUICK.steps} loss ' in printed
    rows = ex.read_results(out / ex.RESULTS_CSV)
    expected = {s.name for s in ex.plan(ex.QUICK)}
    assert {r['run_name'] for r in rows} == expected
    for r in rows:
        assert math.isfinite(r['val_loss']) and r['val_ppl'] == pytest.approx(math.exp(r['val_loss']), rel=1e-6)
        assert r['steps'] == (ex.QUICK.steps // 4 if r['setting'] == 'stable' else ex.QUICK.steps)
        assert r['tokens'] == r['steps'] * r['batch'] * ex.QUICK.seq_len
        assert r['wall_s'] > 0 and r['batch_s'] > 0
        assert r['spikes'] == 0  # at most 8 batches, fewer than the counter's min_history of 10
    # the monitored runs: the d/u gap of the last layer, near sqrt(2N) for Small init and 1 for WeSaR
    for shape, dims in ex.QUICK_SHAPES.items():
        small, wesar = (
            next(r for r in rows if r['group'] == 'main' and r['shape'] == shape and r['method'] == m)
            for m in ('small_rapid', 'wesar')
        )
        assert small['d_over_u_last'] == pytest.approx(math.sqrt(2 * dims['n_layers']), rel=0.35)
        assert wesar['d_over_u_last'] == pytest.approx(1.0, rel=0.35)
    figures = out / 'figures'
    for name in (
        'loss_base.png',
        'loss_deep.png',
        'lr_sweep.png',
        'base/update_ratio_heatmap.png',
        'deep/param_norm_L5.png',
        'deep/update_ratio_L5.png',
    ):
        assert (figures / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name
    norms = ex.table_norms(out).splitlines()
    assert len(norms) == 2 + 2 * len(ex.QUICK_SHAPES)  # header, rule, Small init and WeSaR per shape
    text = page.read_text()
    assert 'old table' not in text and 'Prose stays.' in text and 'kept as is' in text
    assert ex.render_tables(rows)['main-base'] in text
    assert ex.render_tables(rows)['lr'] in text


def test_a_missing_page_is_refused_before_any_figure(tmp_path, capsys):
    results = tmp_path / 'results'
    results.mkdir()
    tables._append_row(results / ex.RESULTS_CSV, results_row('wesar', 0, 4.5))
    missing = tmp_path / 'missing.md'
    assert ex.main(['--render', str(results), '--page', str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--page '{missing}' does not exist" in err
    assert not (results / 'figures').exists()  # checked before drawing


def test_render_reproduces_the_tables_from_a_results_file(tmp_path):
    rows = []
    for seed, (small, wesar) in enumerate(((5.0, 4.5), (5.2, 4.7))):
        for method, loss, spikes in (('small_rapid', small, 1), ('wesar', wesar, 0)):
            rows.append(
                results_row(
                    method,
                    seed,
                    loss,
                    spikes=spikes,
                    d_over_u_last=2.8 if method == 'small_rapid' else 1.0,
                    wall_s=100.0 + seed,
                )
            )
    rows.append(
        {
            **rows[1],
            'group': 'lr',
            'lr': 3e-2,
            'val_loss': float('nan'),
            'spikes': 2,
            'diverged': 1,
            'run_name': 'lr-base-wesar-s0',
        }
    )
    results = tmp_path / 'results' / ex.RESULTS_CSV
    results.parent.mkdir()
    for row in rows:
        tables._append_row(results, row)
    page = tmp_path / 'page.md'
    page.write_text(PAGE)
    assert ex.main(['--render', str(results.parent), '--page', str(page), '--no-figures']) == 0
    text = page.read_text()
    # mean ± sample std over the two seeds, the delta against Small init, the spike total
    assert '| Small init (rapid) | 5.100 ± 0.141 |' in text
    assert '| WeSaR | 4.600 ± 0.141 |' in text and '| -0.500 | 0 | 2 |' in text
    assert '| base | WeSaR | 0.03 | - | 1 / 1 | 2 | 1 / 1 | 1 |' in text  # no finite loss: '-'
    assert 'base, WeSaR: largest lr with no spike or divergence in any seed: 0.001' in text
    assert 'base, Small init (rapid): every lr tried spiked or diverged' in text
