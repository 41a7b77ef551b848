"""``wesar-plot`` with no ``--tracking-uri`` finds the demo YAML's store, ``./runs/mlruns``."""

from omegaconf import OmegaConf as om

from tests.tools.test_plotting import make_store
from wesar_composer.tools import plotting
from wesar_composer.tools.demo_yaml import demo_yaml


def test_default_store_is_where_the_demo_yaml_logs(tmp_path, monkeypatch, capsys):
    assert om.load(demo_yaml().open()).variables.mlflow_tracking_uri == plotting.DEFAULT_STORES[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    assert plotting.main(['--out', 'plots']) == 2
    assert 'No MLflow store in ./runs/mlruns or ./mlruns' in capsys.readouterr().err
    make_store(tmp_path / 'runs' / 'mlruns', [('demo-wesar', True)])
    assert plotting.main(['--out', 'plots']) == 0
    assert 'update_ratio_L1.png' in capsys.readouterr().out
    monkeypatch.setenv('MLFLOW_TRACKING_URI', str(tmp_path / 'elsewhere'))
    assert plotting.main(['--out', 'plots']) == 2  # the variable wins, and names its folder
    assert 'elsewhere' in capsys.readouterr().err
