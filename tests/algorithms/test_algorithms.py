"""Every algorithm of the package, from the table in ``algorithm_settings.py``, the way Composer tests its own.

Train (a Composer Trainer fits 2 batches, then fits again), resumption (a checkpoint every batch;
resumed from batch 1, the batch-2 checkpoint equals the uninterrupted one exactly), the llm-foundry
registry, ``required_on_load`` and an eval-able ``repr``, fold and export (``merge_reparameterization``
keeps the logits and gives the plain model's state-dict keys), and bad input: a clear error,
raised before the model changes. GPT-2's ``Conv1D`` projections (weight stored in x out) are
refused instead of being skipped; an ``nn.Linear`` with no role is refused unless the role map
names it; every hyperparameter is checked where the object is built, and a YAML key the object
does not take lists the valid ones.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from llmfoundry.utils.builders import build_algorithm, build_callback
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from tests.algorithms.algorithm_settings import (
    ALL,
    MODEL_CHANGING,
    REGISTERED,
    SETTINGS,
    AlgorithmSettings,
    settings_params,
)
from tests.common import TokenBatches, cpu_trainer, mpt, snapshot, token_batch
from tests.common import assert_unchanged as assert_state_unchanged
from wesar_composer import LossSpikeCounter, UpdateRatioMonitor, WeSaR, ZLoss, merge_reparameterization
from wesar_composer.algorithms.sigma_reparam import request_power_iteration

TRAIN_MODEL = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=32)


def trainer_for(settings: AlgorithmSettings, **kwargs) -> Trainer:
    return cpu_trainer(
        mpt(**TRAIN_MODEL),
        dataloader=DataLoader(TokenBatches(n=16, seq=32, vocab=256), batch_size=4),
        algorithms=[settings.build()],
        **kwargs,
    )


# --- train ----------------------------------------------------------------------------------


@pytest.mark.parametrize('settings', settings_params())
def test_algorithm_trains(settings):
    """Composer's shape: fit 2 batches, then fit again; the algorithm's modules train and the loss is finite."""
    logger = InMemoryLogger()
    trainer = trainer_for(settings, max_duration='2ba', loggers=[logger])
    model = trainer.state.model
    installed = [m for m in model.modules() if isinstance(m, settings.module_types)]
    assert bool(installed) == settings.changes_model
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit()
    trainer.fit(duration='1ba')
    assert int(trainer.state.timestamp.batch) == 3
    losses = [float(v) for _, v in logger.data['loss/train/total']]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    if settings.key == 'z_loss':
        assert len(logger.data['loss/train/z_loss']) == 3
    end = model.state_dict()
    assert end.keys() == start.keys()
    moved = [k for k in start if k.endswith('weight') and not torch.equal(start[k], end[k])]
    assert any('Wqkv' in k for k in moved) and any('down_proj' in k for k in moved)
    trainer.close()


# --- resumption -----------------------------------------------------------------------------


def _assert_same(a, b, path='state'):
    """Exact equality of nested checkpoint state: tensors bit for bit, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f'{path}.{key}')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


@pytest.mark.parametrize('settings', settings_params())
def test_algorithm_resumption(settings, tmp_path):
    """A checkpoint every batch; resumed from batch 1, the batch-2 checkpoint equals the uninterrupted one."""
    filename = 'ep{epoch}-ba{batch}-rank{rank}.pt'
    first = trainer_for(
        settings, max_duration='2ba', save_folder=str(tmp_path / 'first'), save_interval='1ba', save_filename=filename
    )
    first.fit()
    first.close()
    resumed = trainer_for(
        settings,
        max_duration='2ba',
        save_folder=str(tmp_path / 'resumed'),
        save_interval='1ba',
        save_filename=filename,
        load_path=str(tmp_path / 'first' / 'ep0-ba1-rank0.pt'),
    )
    resumed.fit()
    resumed.close()
    a = torch.load(tmp_path / 'first' / 'ep0-ba2-rank0.pt', map_location='cpu', weights_only=False)['state']
    b = torch.load(tmp_path / 'resumed' / 'ep0-ba2-rank0.pt', map_location='cpu', weights_only=False)['state']
    assert any(k.endswith('Wqkv.weight') for k in a['model'])
    extra = {k.rpartition('.')[2] for k in a['model']} & (settings.extra_state_keys | {'weight'})
    assert extra == settings.extra_state_keys | {'weight'}
    _assert_same(a['model'], b['model'], 'model')
    _assert_same(a['optimizers'], b['optimizers'], 'optimizers')
    before = torch.load(tmp_path / 'first' / 'ep0-ba1-rank0.pt', map_location='cpu', weights_only=False)['state']
    assert not all(torch.equal(v, a['model'][k]) for k, v in before['model'].items())  # batch 2 changed the model


# --- registry, required_on_load, repr -------------------------------------------------------


@pytest.mark.parametrize('settings', settings_params())
def test_registry_builds_the_algorithm(settings):
    assert isinstance(build_algorithm(settings.key, {}), settings.algorithm_cls)
    built = build_algorithm(settings.key, dict(settings.kwargs))
    assert isinstance(built, settings.algorithm_cls)
    assert repr(built) == repr(settings.build())


@pytest.mark.slow
def test_llmfoundry_registry_cli_finds_every_algorithm():
    """``llmfoundry registry find algorithms <key>`` for every key, in one process."""
    script = (
        'import sys\n'
        'from llmfoundry.cli.cli import app\n'
        'for key in sys.argv[1:]:\n'
        "    print(f'=== {key}', flush=True)\n"
        "    app(['registry', 'find', 'algorithms', key], standalone_mode=False)\n"
    )
    env = {**os.environ, 'COLUMNS': '400'}
    out = subprocess.run([sys.executable, '-c', script, *ALL], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sections = out.stdout.split('=== ')[1:]
    assert [s.split(maxsplit=1)[0] for s in sections] == ALL
    for key, section in zip(ALL, sections):
        assert f'wesar_composer.algorithms.{key}' in section, section


def test_every_registered_algorithm_has_a_row():
    assert REGISTERED, 'no llmfoundry_algorithms entry point of wesar_composer: is the package installed?'
    assert set(REGISTERED) == set(SETTINGS), (
        'a registered algorithm without a settings row, or a row without entry point'
    )


# The repr each algorithm stored in checkpoints before its hyperparameters moved into one config:
# Composer keeps it under the checkpoint's `algorithms`, and the resume guard reads it back.
STORED_REPRS = {
    'wesar': "WeSaR(sigma_squared=4e-05, backbone='he', trainable_gates=True, gate_weight_decay=0.0, "
    "embedding_scaling=True, role_map={'x': 'q'}, init_mode='auto', sigma_reference_width=None)",
    'paper_init': "PaperInit(backbone='small', embedding_scaling=True, role_map=None, init_mode='auto', "
    'matrix_lr_sigma_squared=None)',
    'weight_norm': 'WeightNorm(sigma_squared=0.00016, embedding_scaling=True, gain_weight_decay=0.0, role_map=None, '
    "init_mode='auto')",
    'sigma_reparam': 'SigmaReparam(sigma_squared=0.00064, embedding_scaling=True, gate_weight_decay=0.0, '
    "role_map=None, init_mode='auto')",
    'residual_scaling': "ResidualScaling(backbone='small', embedding_scaling=True, role_map=None, init_mode='auto')",
}


@pytest.mark.parametrize('key', sorted(STORED_REPRS))
def test_repr_stored_by_earlier_checkpoints_still_builds_the_same_algorithm(key):
    cls = SETTINGS[key].algorithm_cls
    rebuilt = eval(STORED_REPRS[key], {cls.__name__: cls})
    assert repr(rebuilt) == STORED_REPRS[key]
    assert repr(cls(**rebuilt.config.as_kwargs())) == STORED_REPRS[key]


@pytest.mark.parametrize('settings', settings_params())
def test_required_on_load_and_repr(settings):
    """Composer's required_on_load contract: repr is eval-able, rebuilds the algorithm and names every hyperparameter."""
    cls = settings.algorithm_cls
    assert cls.required_on_load() is settings.changes_model
    for algorithm in (cls(), settings.build()):
        text = repr(algorithm)
        assert ' at 0x' not in text
        rebuilt = eval(text, {cls.__name__: cls})
        assert type(rebuilt) is cls and repr(rebuilt) == text
    for name, value in settings.kwargs.items():
        assert f'{name}={value!r}' in repr(settings.build())


# --- fold and export ------------------------------------------------------------------------


def _logits(model, tokens):
    with torch.no_grad():
        return model.model(tokens).logits


@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('settings', settings_params(MODEL_CHANGING))
def test_fold_back_gives_the_same_logits_and_the_plain_state_dict(settings, tied):
    shape = dict(d_model=64, n_heads=4, n_layers=3, vocab_size=256, max_seq_len=32, tie_word_embeddings=tied)
    model = mpt(**shape)
    plain_keys = set(mpt(**shape).model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings.apply(model, optimizer, **settings.kwargs)
    added = {k.rpartition('.')[2] for k in set(model.model.state_dict()) - plain_keys}
    assert added == (settings.tied_extra_state_keys if tied else settings.extra_state_keys)
    model.train()
    for i in range(3):
        request_power_iteration(model)
        batch = token_batch(seed=i)
        optimizer.zero_grad()
        model.loss(model(batch), batch).backward()
        optimizer.step()
    tokens = token_batch(seed=7)['input_ids']
    before = _logits(model.eval(), tokens)
    merge_reparameterization(model)
    assert not any(isinstance(m, settings.module_types) for m in model.modules())
    assert set(model.model.state_dict()) == plain_keys
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-4, atol=1e-5)
    reloaded = mpt(**shape, seed=123)  # a fresh plain MPT with the merged tensors
    reloaded.model.load_state_dict(model.model.state_dict())
    reloaded.model.logit_scale = model.model.logit_scale
    torch.testing.assert_close(_logits(reloaded.eval(), tokens), before, rtol=1e-4, atol=1e-5)


# --- refusals -------------------------------------------------------------------------------


def assert_unchanged(model, before):
    assert_state_unchanged(model, before)
    assert not any(hasattr(m, 'gate') or hasattr(m, 'weight_g') for m in model.modules())


@pytest.mark.parametrize('settings', settings_params(MODEL_CHANGING))
def test_gpt2_conv1d_is_refused_before_any_change(settings):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    before = snapshot(model)
    with pytest.raises(ValueError, match=f'{settings.key}: GPT2LMHeadModel uses transformers Conv1D projections'):
        settings.apply(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize('settings', settings_params(MODEL_CHANGING))
def test_a_linear_without_a_role_is_refused_unless_skipped(settings):
    model = mpt(n_layers=2)
    model.model.transformer.blocks[0].ffn.router = torch.nn.Linear(128, 4, bias=False)
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=rf"{settings.key}: no role for the nn.Linear modules \['transformer.blocks.0.ffn.router'\]"
    ):
        settings.apply(model)
    assert_unchanged(model, before)
    settings.apply(model, role_map={r'\.router$': 'skip'})
    assert type(model.model.transformer.blocks[0].ffn.router) is torch.nn.Linear
    assert any(isinstance(m, settings.module_types) for m in model.modules())


@pytest.mark.parametrize('settings', settings_params(MODEL_CHANGING))
def test_a_hyperparameter_passed_in_the_optimizers_slot(settings):
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"optimizers must be torch optimizers \(or None\), got \('he',\)"):
        settings.apply(model, 'he')
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    'settings, name, value',
    [pytest.param(s, n, v, id=f'{s.key}-{n}-{v!r}') for s in SETTINGS.values() for n, v in s.bad_kwargs],
)
def test_bad_hyperparameter_named_where_the_algorithm_is_built(settings, name, value):
    with pytest.raises(ValueError, match=name):
        build_algorithm(settings.key, {name: value})
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=name):
        settings.apply(model, **{name: value})
    assert_unchanged(model, before)


@pytest.mark.parametrize('settings', settings_params())
def test_unknown_key_lists_the_valid_ones(settings):
    with pytest.raises(TypeError, match=r"got unknown hyperparameter\(s\) \['sigma'\]; valid ones are \[.*\]"):
        build_algorithm(settings.key, {'sigma': 1e-4})
    for name in settings.kwargs:
        with pytest.raises(TypeError, match=rf'valid ones are \[.*{name}.*\]'):
            build_algorithm(settings.key, {'sigma': 1e-4})


def test_unknown_key_message_names_the_valid_keys_of_wesar():
    with pytest.raises(TypeError) as info:
        WeSaR(sigma=1e-4)
    for key in (
        'sigma_squared',
        'backbone',
        'trainable_gates',
        'gate_weight_decay',
        'embedding_scaling',
        'role_map',
        'init_mode',
    ):
        assert key in str(info.value)


@pytest.mark.parametrize('value', [0, -1e-4, 'big', True, float('nan')])
def test_z_loss_weight(value):
    with pytest.raises(ValueError, match='z_loss weight must be a positive finite number'):
        ZLoss(weight=value)


@pytest.mark.parametrize(
    'name, cls', [('update_ratio_monitor', UpdateRatioMonitor), ('loss_spike_counter', LossSpikeCounter)]
)
def test_callbacks_refuse_unknown_keys(name, cls):
    with pytest.raises(TypeError, match=r"got unknown hyperparameter\(s\) \['log_intervall'\]; valid ones are"):
        build_callback(name, {'log_intervall': 5})
