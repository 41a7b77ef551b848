"""Bad input for every algorithm and callback: a clear error, raised before the model changes.

GPT-2's ``Conv1D`` projections (weight stored in x out) are refused instead of being skipped;
an ``nn.Linear`` with no role is refused unless the role map names it; every hyperparameter is
checked where the object is built, and a YAML key the object does not take lists the valid ones.
"""

import pytest
import torch
from llmfoundry.utils.builders import build_algorithm, build_callback
from transformers import GPT2Config, GPT2LMHeadModel

from tests.common import APPLY_WITH_SEED, mpt
from wesar_composer import (
    LossSpikeCounter,
    PaperInit,
    ResidualScaling,
    SigmaReparam,
    UpdateRatioMonitor,
    WeightNorm,
    WeSaR,
    ZLoss,
)

ALGORITHMS = {
    'wesar': WeSaR,
    'paper_init': PaperInit,
    'weight_norm': WeightNorm,
    'sigma_reparam': SigmaReparam,
    'residual_scaling': ResidualScaling,
}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(hasattr(m, 'gate') or hasattr(m, 'weight_g') for m in model.modules())


@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_gpt2_conv1d_is_refused_before_any_change(method):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    before = snapshot(model)
    with pytest.raises(ValueError, match=f'{method}: GPT2LMHeadModel uses transformers Conv1D projections'):
        APPLY_WITH_SEED[method](model)
    assert_unchanged(model, before)


@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_a_linear_without_a_role_is_refused_unless_skipped(method):
    model = mpt(n_layers=2)
    model.model.transformer.blocks[0].ffn.router = torch.nn.Linear(128, 4, bias=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{method}: no role for the nn.Linear modules \['transformer.blocks.0.ffn.router'\]"):
        APPLY_WITH_SEED[method](model)
    assert_unchanged(model, before)
    APPLY_WITH_SEED[method](model, role_map={r'\.router$': 'skip'})
    assert type(model.model.transformer.blocks[0].ffn.router) is torch.nn.Linear


@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_a_hyperparameter_passed_in_the_optimizers_slot(method):
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"optimizers must be torch optimizers \(or None\), got \('he',\)"):
        APPLY_WITH_SEED[method](model, 'he')
    assert_unchanged(model, before)


BAD = {
    'wesar': [('trainable_gates', 'yes'), ('embedding_scaling', 'false'), ('role_map', [1]), ('backbone', 'xavier'),
              ('sigma_squared', '4e-5'), ('gate_weight_decay', -1.0), ('init_mode', 'keep')],
    'paper_init': [('embedding_scaling', 'false'), ('role_map', [1]), ('backbone', 1), ('init_mode', 'preserve')],
    'weight_norm': [('embedding_scaling', 0), ('sigma_squared', 0.0), ('gain_weight_decay', 'none'), ('role_map', 'x')],
    'sigma_reparam': [('embedding_scaling', 'yes'), ('sigma_squared', -1), ('role_map', {1: 'u'})],
    'residual_scaling': [('embedding_scaling', 'no'), ('backbone', 'xavier'), ('role_map', [1])],
}


@pytest.mark.parametrize('method, name, value', [(m, n, v) for m, bad in BAD.items() for n, v in bad])
def test_bad_hyperparameter_named_where_the_algorithm_is_built(method, name, value):
    with pytest.raises(ValueError, match=name):
        build_algorithm(method, {name: value})
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=name):
        APPLY_WITH_SEED[method](model, **{name: value})
    assert_unchanged(model, before)


@pytest.mark.parametrize('method', [*ALGORITHMS, 'z_loss'])
def test_unknown_key_lists_the_valid_ones(method):
    with pytest.raises(TypeError, match=r"got unknown hyperparameter\(s\) \['sigma'\]; valid ones are \[.*\]"):
        build_algorithm(method, {'sigma': 1e-4})


def test_unknown_key_message_names_the_valid_keys_of_wesar():
    with pytest.raises(TypeError) as info:
        WeSaR(sigma=1e-4)
    for key in ('sigma_squared', 'backbone', 'trainable_gates', 'gate_weight_decay', 'embedding_scaling', 'role_map',
                'init_mode'):
        assert key in str(info.value)


@pytest.mark.parametrize('value', [0, -1e-4, 'big', True, float('nan')])
def test_z_loss_weight(value):
    with pytest.raises(ValueError, match='z_loss weight must be a positive finite number'):
        ZLoss(weight=value)


@pytest.mark.parametrize('name, cls', [('update_ratio_monitor', UpdateRatioMonitor), ('loss_spike_counter', LossSpikeCounter)])
def test_callbacks_refuse_unknown_keys(name, cls):
    with pytest.raises(TypeError, match=r"got unknown hyperparameter\(s\) \['log_intervall'\]; valid ones are"):
        build_callback(name, {'log_intervall': 5})


def test_every_repr_rebuilds_the_algorithm():
    """Composer's required_on_load contract: repr is eval-able and names every hyperparameter."""
    for cls in [*ALGORITHMS.values(), ZLoss]:
        algorithm = cls()
        text = repr(algorithm)
        assert ' at 0x' not in text
        rebuilt = eval(text, {cls.__name__: cls})
        assert repr(rebuilt) == text
