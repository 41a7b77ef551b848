"""The monitor's keys through llm-foundry's train path into an MLflow file store, and wesar-plot on them."""

import math
from pathlib import Path

import pytest
from llmfoundry.command_utils import train_from_yaml

from tests.common import tiny_train_config, write_train_yaml
from wesar_composer.tools.plotting import load_runs, main

STEPS = 6
RUNS = {'baseline': {}, 'wesar': {'wesar': {}}}  # run name -> algorithms


@pytest.fixture(scope='module')
def store(tiny_mds, tmp_path_factory):
    """Two short runs (plain and WeSaR) logging to MLflow and to memory; returns (store path, memory logs)."""
    root = tmp_path_factory.mktemp('mlflow')
    memory = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, algorithms in RUNS.items():
            cfg = tiny_train_config(
                tiny_mds,
                algorithms=algorithms,
                callbacks={
                    'update_ratio_monitor': {'log_interval': 1, 'families': 'all', 'layers': 'all'},  # the full view
                    'loss_spike_counter': {},
                },
                loggers={
                    'mlflow': {
                        'tracking_uri': str(root / 'mlruns'),
                        'experiment_name': 'monitor-test',
                        'log_system_metrics': False,
                    },
                    'inmemory': {},
                },
                run_name=name,
                max_duration=f'{STEPS}ba',
                eval_interval=f'{STEPS}ba',
                eval_subset_num_batches=1,
                scheduler={'t_warmup': '0ba'},  # Composer's warmup gives lr 0 on the first two steps: no update to see
            )
            trainer = train_from_yaml(str(write_train_yaml(cfg, root / f'{name}.yaml')))
            in_memory = next(d for d in trainer.logger.destinations if hasattr(d, 'data'))
            memory[name] = {k: [(t.batch.value, v) for t, v in values] for k, values in in_memory.data.items()}
            trainer.close()  # ends the MLflow run and flushes its queue
    return root / 'mlruns', memory


def monitor_keys(logged):
    return {k for k in logged if k.split('/')[0] in ('update_ratio', 'param_norm', 'grad_norm', 'gate')}


@pytest.mark.slow
def test_metrics_read_back_from_the_mlflow_file_store(store):
    from mlflow.tracking import MlflowClient

    path, memory = store
    runs = {run.name: run for run in load_runs(str(path), experiment='monitor-test')}
    assert set(runs) == set(RUNS)
    client = MlflowClient(str(path))
    for name, run in runs.items():
        keys = monitor_keys(memory[name])
        assert monitor_keys(run.keys) == keys
        assert any(k.startswith('gate/') for k in keys) == (name == 'wesar')
        assert len([k for k in keys if k.startswith('update_ratio/L')]) == 2 * 6  # 2 layers x q k v o u d
        for key in keys:
            points = sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)
            assert [m.step for m in points] == list(range(1, STEPS + 1)), key
            assert [m.value for m in points] == pytest.approx([v for _, v in memory[name][key]], rel=1e-12), key
            assert all(math.isfinite(m.value) and m.value > 0 for m in points), key
        assert 'loss_spike/count' in run.keys and 'loss/train/total' in run.keys


@pytest.mark.slow
def test_wesar_plot_draws_the_three_pictures(store, tmp_path, capsys):
    """wesar-plot's main in this process (the console script itself: tests/tools/test_tools_layout.py)."""
    path, _ = store
    out = tmp_path / 'plots'
    rc = main(['--tracking-uri', str(path), '--runs', 'baseline', 'wesar', '--out', str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    written = [Path(line) for line in printed.out.split()]
    assert [p.name for p in written] == ['update_ratio_L1.png', 'param_norm_L1.png', 'update_ratio_heatmap.png']
    import matplotlib.image

    for png in written:
        assert png.stat().st_size > 20_000, png
        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 300 and width > 500, (png, height, width)


@pytest.mark.slow
def test_plot_errors_name_what_exists(store, tmp_path, capsys):
    path, _ = store
    assert main(['--tracking-uri', str(path), '--runs', 'baseline', 'nope', '--out', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No run named or with id 'nope'" in err and "'baseline'" in err and "'wesar'" in err
    assert main(['--tracking-uri', str(path), '--layer', '7', '--out', str(tmp_path)]) == 2
    assert 'Layer 7 is not logged in every run; logged layers are [0, 1]' in capsys.readouterr().err
    assert main(['--tracking-uri', str(tmp_path / 'missing'), '--out', str(tmp_path)]) == 2
    assert 'No MLflow store at' in capsys.readouterr().err
    baseline = load_runs(str(path), ['baseline'])[0]
    with pytest.raises(KeyError, match=r"no metric 'gate/L1/d'. It has no gate/ keys"):
        baseline.history('gate/L1/d')
    with pytest.raises(KeyError, match=r"no metric 'update_ratio/L9/d'.*'update_ratio/L0/d'"):
        baseline.history('update_ratio/L9/d')
