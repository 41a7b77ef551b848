"""A checkpoint whose reparameterization differs from the run's is refused, naming the algorithm."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.common import assert_unchanged, mpt, snapshot
from tests.common.checkpoints import train_and_save
from wesar_composer import apply_paper_init, apply_sigma_reparam, apply_weight_norm, apply_wesar
from wesar_composer.reparam.checkpoints import (
    CheckedLoadPlanner,
    check_sharded_checkpoint,
    guard_model_loads,
    methods_of_keys,
)


def test_methods_are_told_apart_by_their_keys():
    assert methods_of_keys(apply_wesar(mpt(n_layers=2)).state_dict()) == {'wesar': 'model.transformer.wte.gate'}
    assert set(methods_of_keys(apply_sigma_reparam(mpt(n_layers=2)).state_dict())) == {'sigma_reparam'}
    assert set(methods_of_keys(apply_weight_norm(mpt(n_layers=2)).state_dict())) == {'weight_norm'}
    assert methods_of_keys(apply_paper_init(mpt(n_layers=2)).state_dict()) == {}


def test_model_load_of_a_wesar_checkpoint_without_wesar():
    saved = apply_wesar(mpt(n_layers=2)).state_dict()
    model = guard(apply_paper_init(mpt(n_layers=2)))
    with pytest.raises(ValueError, match='saved by a run with the wesar algorithm .*Add `algorithms: {wesar: ...}`'):
        model.load_state_dict(saved, strict=False)


def test_model_load_of_a_plain_checkpoint_into_wesar():
    saved = mpt(n_layers=2).state_dict()
    model = guard(apply_wesar(mpt(n_layers=2)))
    before = snapshot(model)
    with pytest.raises(ValueError, match='saved by a run without the wesar algorithm.*init_mode: preserve'):
        model.load_state_dict(saved, strict=False)
    assert_unchanged(model, before)  # nothing loaded


def test_matching_checkpoint_loads():
    saved = apply_wesar(mpt(n_layers=2, seed=1), seed=1).state_dict()
    model = guard(apply_wesar(mpt(n_layers=2), seed=2))
    model.load_state_dict(saved)
    assert torch.equal(model.state_dict()['model.transformer.wte.gate'], saved['model.transformer.wte.gate'])


def guard(model):
    guard_model_loads(model)
    return model


def test_sharded_checkpoint_metadata(tmp_path):
    wesar = apply_wesar(mpt(n_layers=2))
    dcp.save({'state': {'model': wesar.state_dict()}}, checkpoint_id=str(tmp_path / 'ckpt'))
    assert check_sharded_checkpoint(str(tmp_path / 'ckpt'), apply_wesar(mpt(n_layers=2)))
    with pytest.raises(ValueError, match=r'the sharded checkpoint .*ckpt was saved by a run with the wesar algorithm'):
        check_sharded_checkpoint(str(tmp_path / 'ckpt'), apply_paper_init(mpt(n_layers=2)))
    assert not check_sharded_checkpoint(str(tmp_path / 'missing'), mpt(n_layers=2))


def test_sharded_load_planner_refuses_before_loading(tmp_path):
    plain = mpt(n_layers=2)
    dcp.save({'state': {'model': plain.state_dict()}}, checkpoint_id=str(tmp_path / 'ckpt'))
    target = {'state': {'model': apply_wesar(mpt(n_layers=2)).state_dict()}}
    with pytest.raises(
        CheckpointException, match='ValueError: the sharded checkpoint was saved by a run without the wesar'
    ):
        dcp.load(target, checkpoint_id=str(tmp_path / 'ckpt'), planner=CheckedLoadPlanner())
    target = {'state': {'model': mpt(n_layers=2).state_dict()}}
    dcp.load(target, checkpoint_id=str(tmp_path / 'ckpt'), planner=CheckedLoadPlanner())  # a match loads


@pytest.mark.slow
def test_train_from_yaml_refuses_a_wesar_checkpoint_in_a_small_init_run(tiny_train_yaml, tmp_path, monkeypatch):
    """The monolithic Composer checkpoint of a WeSaR run, loaded with load_path by paper_init and back."""
    from llmfoundry.command_utils import train_from_yaml

    monkeypatch.chdir(tmp_path)
    wesar_ckpt = train_and_save(tiny_train_yaml, tmp_path / 'wesar', {'wesar': {}})
    small_ckpt = train_and_save(tiny_train_yaml, tmp_path / 'small', {'paper_init': {}})
    assert wesar_ckpt.exists() and small_ckpt.exists()
    with pytest.raises(ValueError, match='saved by a run with the wesar algorithm'):
        train_from_yaml(
            str(tiny_train_yaml(algorithms={'paper_init': {}}, max_duration='3ba', load_path=str(wesar_ckpt)))
        )
    with pytest.raises(ValueError, match='saved by a run without the wesar algorithm'):
        train_from_yaml(str(tiny_train_yaml(algorithms={'wesar': {}}, max_duration='3ba', load_path=str(small_ckpt))))
    trainer = train_from_yaml(
        str(
            tiny_train_yaml(
                algorithms={'wesar': {}}, max_duration='3ba', eval_interval='3ba', load_path=str(wesar_ckpt)
            )
        )
    )
    assert int(trainer.state.timestamp.batch) == 3
    # A run with none of this package's algorithms, loading weights only as llmfoundry eval does: the
    # package's config transform refuses it before any work (tests/reparam/test_resume_guard.py covers the
    # full resume), naming wesar; Composer's strict load would name the unexpected gate keys after it.
    with pytest.raises(ValueError, match=r'saved by a run with the wesar algorithm .*do not list wesar'):
        train_from_yaml(str(tiny_train_yaml(max_duration='3ba', load_path=str(wesar_ckpt), load_weights_only=True)))
