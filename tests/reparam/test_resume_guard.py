"""A run that would load a reparameterized checkpoint without listing its algorithm stops before any work."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from tests.common import mpt
from tests.common.checkpoints import train_and_save
from wesar_composer import apply_sigma_reparam, apply_weight_norm, apply_wesar
from wesar_composer.reparam import resume_guard
from wesar_composer.reparam.resume_guard import check_resume, checkpoint_to_load


def _composer_file(path, model, algorithms=()):
    """A file shaped like Composer's monolithic checkpoint: ``{'state': {'model': ..., 'algorithms': ...}}``."""
    torch.save({'state': {'model': model.state_dict(), 'algorithms': list(algorithms)}, 'rng': []}, path)
    return str(path)


def _cfg(**kwargs):
    return {'algorithms': {'gradient_clipping': {}}, **kwargs}


def test_registered_as_an_llmfoundry_config_transform():
    transforms = {ep.name: ep.value for ep in importlib.metadata.entry_points(group='llmfoundry_config_transforms')}
    assert transforms.get('wesar_resume_check') == 'wesar_composer.reparam.resume_guard:check_resume'
    from llmfoundry.registry import config_transforms

    assert config_transforms.get('wesar_resume_check') is check_resume


@pytest.mark.parametrize(
    ('method', 'apply', 'key'),
    [
        ('wesar', apply_wesar, '.gate'),
        ('weight_norm', apply_weight_norm, '.weight_g'),
        ('sigma_reparam', apply_sigma_reparam, '(gate|sn_)'),
    ],
)
def test_monolithic_checkpoint_of_an_unlisted_algorithm(tmp_path, method, apply, key):
    path = _composer_file(tmp_path / 'ep0-ba2-rank0.pt', apply(mpt(n_layers=2)))
    with pytest.raises(ValueError, match=rf'saved by a run with the {method} algorithm \(keys such as .*{key}') as err:
        check_resume(_cfg(load_path=path))
    message = str(err.value)
    assert path in message and 'they list: gradient_clipping' in message
    assert f'Add `algorithms: {{{method}: ...}}`' in message and 'hf_checkpointer' in message
    cfg = _cfg(load_path=path)
    cfg['algorithms'][method] = {}
    assert check_resume(cfg) is cfg  # listed: the algorithm's own guards compare the rest once the model exists


def test_the_message_shows_the_recorded_hyperparameters_and_merge_gates(tmp_path):
    record = ('WeSaR', {'repr': "WeSaR(sigma_squared=4e-05, backbone='he')"})
    path = _composer_file(tmp_path / 'c.pt', apply_wesar(mpt(n_layers=2)), [record])
    with pytest.raises(ValueError, match=r"it records WeSaR\(sigma_squared=4e-05, backbone='he'\).*merge_gates"):
        check_resume({'load_path': path})  # no algorithms at all
    with pytest.raises(ValueError, match=r'they list: none'):
        check_resume({'load_path': path, 'algorithms': None})


def test_residual_scaling_is_known_by_its_record(tmp_path):
    record = ('ResidualScaling', {'repr': 'ResidualScaling()'})
    path = _composer_file(tmp_path / 'c.pt', mpt(n_layers=2), [record])
    with pytest.raises(ValueError, match=r'with the residual_scaling algorithm \(it records ResidualScaling\(\)\)'):
        check_resume(_cfg(load_path=path))
    plain = _composer_file(tmp_path / 'plain.pt', mpt(n_layers=2), [('GradientClipping', {'repr': 'x'})])
    assert check_resume(_cfg(load_path=plain))['load_path'] == plain


def test_sharded_checkpoint_folder(tmp_path):
    folder = tmp_path / 'ep0-ba2'
    dcp.save({'state': {'model': apply_wesar(mpt(n_layers=2)).state_dict()}}, checkpoint_id=str(folder))
    with pytest.raises(ValueError, match=r'saved by a run with the wesar algorithm \(keys such as .*gate'):
        check_resume(_cfg(load_path=str(folder)))
    plain = tmp_path / 'plain'
    dcp.save({'state': {'model': mpt(n_layers=2).state_dict()}}, checkpoint_id=str(plain))
    check_resume(_cfg(load_path=str(plain)))


def test_autoresume_checks_the_latest_checkpoint_of_the_save_folder(tmp_path):
    (tmp_path / 'tiny').mkdir()
    latest = _composer_file(tmp_path / 'tiny' / 'ep0-ba2-rank0.pt', apply_wesar(mpt(n_layers=2)))
    (tmp_path / 'tiny' / 'latest-rank0.pt').symlink_to(latest)
    cfg = _cfg(run_name='tiny', save_folder=str(tmp_path / '{run_name}'), autoresume=True)
    assert checkpoint_to_load(cfg) == str(tmp_path / 'tiny' / 'latest-rank0.pt')
    with pytest.raises(ValueError, match='latest-rank0.pt.*with the wesar algorithm'):
        check_resume(cfg)
    assert checkpoint_to_load({**cfg, 'autoresume': False}) is None
    assert checkpoint_to_load({**cfg, 'run_name': 'other', 'load_path': 'x/{run_name}/{rank}.pt'}) == 'x/other/0.pt'


def test_nothing_is_read_when_nothing_is_loaded_or_the_path_is_remote(tmp_path, monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError('read a checkpoint')

    monkeypatch.setattr(resume_guard, 'saved_methods', no_read)
    cfg = _cfg(save_folder=str(tmp_path), run_name='r')  # saves, autoresume off, loads nothing
    assert check_resume(cfg) is cfg
    monkeypatch.undo()
    monkeypatch.setattr(torch, 'load', no_read)
    for path in ('s3://bucket/ckpt/ep0-ba2-rank0.pt', str(tmp_path / 'missing.pt')):
        assert check_resume(_cfg(load_path=path))['load_path'] == path


@pytest.mark.slow
def test_train_from_yaml_stops_before_training_on_a_wesar_checkpoint_without_wesar(
    tiny_train_yaml, tmp_path, monkeypatch
):
    """Train 2 batches with WeSaR and save; a YAML whose algorithms list only gradient clipping and
    that loads that checkpoint stops in llm-foundry's config transforms, before the model is built."""
    from llmfoundry.command_utils import train_from_yaml

    monkeypatch.chdir(tmp_path)
    checkpoint = train_and_save(tiny_train_yaml, tmp_path / 'wesar', {'wesar': {}})
    assert checkpoint.exists()
    resumed = tiny_train_yaml(max_duration='4ba', load_path=str(checkpoint), save_folder=str(tmp_path / 'resumed'))
    assert list(yaml.safe_load(resumed.read_text())['algorithms']) == ['gradient_clipping']
    with pytest.raises(
        ValueError, match=r'saved by a run with the wesar algorithm .*WeSaR\(.*\).*Add `algorithms: {wesar'
    ) as err:
        train_from_yaml(str(resumed))
    assert any(entry.name == 'apply_transforms_to_config' for entry in err.traceback)  # before the model is built
    assert not (tmp_path / 'resumed').exists()  # nothing was saved
