"""The library and its tools: the library never imports ``wesar_composer.tools``; the console
scripts run from any folder on the user's own files, with the YAMLs read from the package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wesar_composer
from wesar_composer.tools import demo

PACKAGE = Path(wesar_composer.__file__).resolve().parent
BIN = Path(sys.executable).parent
CONSOLE_SCRIPTS = ('wesar-data', 'wesar-demo', 'wesar-experiments', 'wesar-plot')


def library_modules() -> list[str]:
    """Every module of the package outside ``wesar_composer/tools``, by dotted name."""
    names = []
    for path in sorted(PACKAGE.rglob('*.py')):
        rel = path.relative_to(PACKAGE.parent).with_suffix('')
        parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
        if parts[:2] != ('wesar_composer', 'tools'):
            names.append('.'.join(parts))
    return names


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'MLFLOW_TRACKING_URI'}  # wesar-plot's default: ./mlruns
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def script(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f'{name} is not installed next to {sys.executable} (pip install -e .)')
    return str(path)


# ------------------------------------------------------------------------------ the library


def test_the_library_source_names_no_tools_module():
    offenders = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if 'tools' in path.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ''] + [f'{node.module}.{a.name}' for a in node.names]
                if node.level and 'tools' in (node.module or '').split('.') + [a.name for a in node.names]:
                    offenders.append(f'{path}:{node.lineno}')  # a relative import of tools
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == 'wesar_composer.tools' or n.startswith('wesar_composer.tools.') for n in names):
                offenders.append(f'{path}:{node.lineno}')
    assert offenders == []


@pytest.mark.slow
def test_importing_every_library_module_loads_no_tool():
    modules = library_modules()
    assert 'wesar_composer' in modules and 'wesar_composer.callbacks' in modules
    assert not any(m.startswith('wesar_composer.tools') for m in modules)
    code = (
        'import importlib, sys\n'
        f'for name in {modules!r}:\n'
        '    importlib.import_module(name)\n'
        'loaded = sorted(m for m in sys.modules if m == "wesar_composer.tools" or m.startswith("wesar_composer.tools."))\n'
        'print("TOOLS", loaded)\n'
    )
    done = run([sys.executable, '-c', code], cwd=PACKAGE.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'TOOLS []' in done.stdout, done.stdout[-2000:]


# ------------------------------------------------------------------------------ package data


def test_the_yamls_ship_as_package_data():
    from importlib import resources

    from wesar_composer.tools.experiments import METHODS, grid

    tools = resources.files('wesar_composer.tools')
    assert tools.joinpath(demo.DEMO_YAML).is_file()
    parts = [part for _, part, _ in METHODS.values() if part]  # '': the study's width-dependent arms, built in code
    assert len(parts) >= 9
    for part in parts:
        assert grid.method_part(part).is_file(), part
    with pytest.raises(FileNotFoundError, match="Method part 'nope' not found"):
        grid.method_part('nope')
    import tomllib

    project = tomllib.loads((PACKAGE.parent / 'pyproject.toml').read_text())
    package_data = project['tool']['setuptools'].get('package-data', {})
    if package_data.get('wesar_composer.tools') != ['yamls/*.yaml', 'yamls/method/*.yaml']:
        pytest.fail('pyproject.toml ships no yamls of wesar_composer.tools as package data')
    # one copy of each YAML: none left in the repository's yamls/ beside the packaged ones
    repo_yamls = PACKAGE.parent / 'yamls'
    assert not (repo_yamls / 'demo' / 'demo.yaml').exists()
    assert not (repo_yamls / 'parts' / 'method').exists()


def test_the_console_scripts_point_into_tools():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group='console_scripts') if ep.name in CONSOLE_SCRIPTS}
    assert found == {
        'wesar-data': 'wesar_composer.tools.data.build:main',
        'wesar-demo': 'wesar_composer.tools.demo:main',
        'wesar-experiments': 'wesar_composer.tools.experiments.cli:main',
        'wesar-plot': 'wesar_composer.tools.plotting:main',
    }
    transforms = {ep.name: ep.value for ep in entry_points(group='llmfoundry_config_transforms')}
    assert transforms.get('wesar_data_check') == 'wesar_composer.tools.data.build:check_train_config'


# ------------------------------------------------------------------------------ from another folder


@pytest.mark.slow
def test_wesar_demo_writes_its_yaml_into_the_current_folder_and_keeps_an_existing_one(tmp_path, monkeypatch, capsys):
    done = run([script('wesar-demo'), '--write-yaml', 'demo.yaml'], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    written = tmp_path / 'demo.yaml'
    assert written.read_text() == demo.demo_yaml().read_text()
    assert 'code_paths' not in __import__('yaml').safe_load(written.read_text())  # the check is an entry point
    written.write_text('# mine\n' + written.read_text())
    monkeypatch.chdir(tmp_path)  # the console script's main, in this process: one launch of it above is enough
    assert demo.main(['--write-yaml', 'demo.yaml']) == 2
    assert 'not overwritten' in capsys.readouterr().err
    assert written.read_text().startswith('# mine\n')
    shown = run([script('wesar-data'), '--help'], cwd=tmp_path)
    assert shown.returncode == 0 and 'usage: wesar-data' in shown.stdout, shown.stderr[-2000:]
    # wesar-plot's console script is launched by test_wesar_plot_reads_and_writes_relative_to_the_current_folder
    from wesar_composer.tools.plotting import main as plot_main

    with pytest.raises(SystemExit) as stopped:
        plot_main(['--help'])
    assert stopped.value.code == 0 and 'usage: wesar-plot' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo.yaml']  # nothing else written


def test_wesar_demo_overwrites_with_force_and_names_a_missing_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path('demo.yaml').write_text('# mine\n')
    assert demo.main(['--write-yaml', 'demo.yaml', '--force']) == 0
    assert Path('demo.yaml').read_text() == demo.demo_yaml().read_text()
    assert demo.main(['--yaml', 'nope.yaml']) == 2
    assert "Demo YAML not found: 'nope.yaml'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo.yaml']  # nothing else written


def test_the_users_own_demo_yaml_is_the_one_trained_from_another_folder(tmp_path, monkeypatch):
    """A copy edited by the user, launched from its folder: its own data_root is checked (relative
    to that folder) by the packaged config transform, before any work."""
    from llmfoundry.command_utils import train

    from wesar_composer.tools.data import DatasetMissingError

    monkeypatch.chdir(tmp_path)
    demo.write_demo_yaml('my.yaml')
    text = Path('my.yaml').read_text()
    assert 'data_root: ./data/shakespeare-v4096-s128' in text
    Path('my.yaml').write_text(text.replace('data_root: ./data/shakespeare-v4096-s128', 'data_root: ./mine'))
    cfg = demo.load_config(demo.find_demo_yaml('my.yaml'), ['variables.mlflow_tracking_uri=./store'])
    assert cfg.variables.data_root == './mine'
    assert demo.load_config(None).variables.data_root == './data/shakespeare-v4096-s128'  # the packaged one
    with pytest.raises(DatasetMissingError, match=r"'mine' does not exist.*`wesar-data --output-dir mine`"):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['my.yaml']  # no MLflow store, no data


@pytest.mark.slow
def test_wesar_plot_reads_and_writes_relative_to_the_current_folder(tmp_path):
    from tests.tools.test_plotting import make_store

    make_store(tmp_path / 'mlruns', [('demo-small_init', True), ('demo-wesar', True)])
    done = run([script('wesar-plot'), '--out', 'plots'], cwd=tmp_path)  # default store: ./mlruns
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        'plots/update_ratio_L1.png',
        'plots/param_norm_L1.png',
        'plots/update_ratio_heatmap.png',
    ]
    for name in done.stdout.split():
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_wesar_experiments_renders_a_results_folder_and_page_of_the_current_folder(tmp_path, monkeypatch, capsys):
    from tests.common.results import results_row
    from tests.tools.test_experiments import PAGE
    from wesar_composer.tools.experiments import RESULTS_CSV, tables

    (tmp_path / 'results').mkdir()
    for seed, loss in enumerate((4.5, 4.7)):
        tables._append_row(tmp_path / 'results' / RESULTS_CSV, results_row('wesar', seed, loss))
    (tmp_path / 'page.md').write_text(PAGE)
    done = run([script('wesar-experiments'), '--render', 'results', '--page', 'page.md'], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '| WeSaR | 4.600 ± 0.141 |' in (tmp_path / 'page.md').read_text()
    assert (tmp_path / 'results' / 'figures' / 'loss_base.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    from wesar_composer.tools.experiments.cli import main as experiments_main

    monkeypatch.chdir(tmp_path)  # the console script's main, in this process: one launch of it above is enough
    assert experiments_main(['--render', 'results', '--yaml', 'nope.yaml']) == 2
    assert "--yaml 'nope.yaml' does not exist" in capsys.readouterr().err
