"""wesar-plot on a hand-made MLflow store: one run per name by default, ids for names shown twice,
Figure 3 left out with a note when param_norm/ is not logged."""

import time

from wesar_composer.tools.plotting import load_runs, main

STEPS = range(1, 6)


def make_store(path, runs):
    """``runs``: (name, with param_norm) in creation order; returns the run ids."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(str(path))
    experiment = client.create_experiment('plots')
    ids = []
    for i, (name, param_norm) in enumerate(runs):
        run = client.create_run(experiment, run_name=name, start_time=1_000 * (i + 1))
        keys = ['loss/train/total', 'update_ratio/L0/d', 'update_ratio/L0/u', 'update_ratio/L1/d', 'update_ratio/L1/u']
        keys += ['param_norm/L1/d', 'param_norm/L1/u'] if param_norm else []
        metrics = [Metric(key, 0.1 * (i + 1) * step, int(time.time() * 1000), step) for key in keys for step in STEPS]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids


def test_without_names_the_newest_run_of_each_name(tmp_path):
    store = tmp_path / 'mlruns'
    ids = make_store(store, [('demo-wesar', True), ('demo-small_init', True), ('demo-wesar', True)])
    runs = load_runs(str(store))
    assert [(r.name, r.run_id) for r in runs] == [('demo-small_init', ids[1]), ('demo-wesar', ids[2])]
    both = load_runs(str(store), [ids[0], ids[2]])  # the same name twice, asked for by id
    assert [r.name for r in both] == [f'demo-wesar ({ids[0][:8]})', f'demo-wesar ({ids[2][:8]})']
    assert load_runs(str(store), ['demo-wesar'])[0].run_id == ids[2]


def test_figure_3_is_left_out_with_a_note_when_param_norm_is_not_logged(tmp_path, capsys):
    store = tmp_path / 'mlruns'
    make_store(store, [('a', True), ('b', False)])
    assert main(['--tracking-uri', str(store), '--out', str(tmp_path / 'plots')]) == 0
    out = capsys.readouterr()
    assert [p.split('/')[-1] for p in out.out.split()] == ['update_ratio_L1.png', 'update_ratio_heatmap.png']
    assert "param_norm_L1.png left out: runs ['b'] log no param_norm/L1/ keys" in out.err
    assert main(['--tracking-uri', str(store), '--runs', 'a', '--out', str(tmp_path / 'a')]) == 0
    assert 'param_norm_L1.png' in capsys.readouterr().out


def test_legends_sit_outside_the_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib.figure import Figure

    from wesar_composer.tools import plotting

    store = tmp_path / 'mlruns'
    make_store(store, [('a', True), ('b', True)])
    saved = []
    monkeypatch.setattr(plotting, '_save', lambda plt, fig, path: saved.append(fig) or path)
    plotting.plot_update_ratios(load_runs(str(store)), str(tmp_path / 'x.png'))
    (fig,) = saved
    assert isinstance(fig, Figure)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == len(set(labels))  # one entry per run and line
        axes_box, legend_box = ax.get_window_extent(renderer), legend.get_window_extent(renderer)
        assert legend_box.x0 >= axes_box.x1  # right of the data, never over it
