"""Bad input: a clear error naming the value, raised before any parameter changes."""

import math

import pytest
from torch import nn

from tests.common import assert_unchanged, mpt, snapshot
from wesar_composer import WeSaR, apply_wesar


@pytest.mark.parametrize('bad', [0.0, -4e-5, math.inf, math.nan, '4e-5', True])
def test_bad_sigma_squared(bad):
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match='sigma_squared must be a positive finite number, got'):
        apply_wesar(model, sigma_squared=bad)
    with pytest.raises(ValueError, match=repr(bad).replace('(', r'\(').replace(')', r'\)')):
        WeSaR(sigma_squared=bad)
    assert_unchanged(model, before)


def test_unknown_backbone():
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"backbone must be one of \('he', 'small'\), got 'xavier'"):
        apply_wesar(model, backbone='xavier')
    with pytest.raises(ValueError, match='xavier'):
        WeSaR(backbone='xavier')
    assert_unchanged(model, before)


def test_role_map_naming_no_module():
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"role_map patterns \['c_fc\$'\] match no nn.Linear"):
        apply_wesar(model, role_map={'c_fc$': 'u'})
    assert_unchanged(model, before)


def test_role_map_with_unknown_role():
    model = mpt(n_layers=2)
    with pytest.raises(ValueError, match="role 'z' for pattern 'up_proj' is not one of"):
        apply_wesar(model, role_map={'up_proj': 'z'})


@pytest.mark.parametrize('bad', [-0.1, math.inf, 'none'])
def test_bad_gate_weight_decay(bad):
    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match='gate_weight_decay must be a finite number >= 0, got'):
        apply_wesar(model, gate_weight_decay=bad)
    with pytest.raises(ValueError, match='gate_weight_decay'):
        WeSaR(gate_weight_decay=bad)
    assert_unchanged(model, before)


def test_bad_role_map_is_rejected_when_the_algorithm_is_built():
    with pytest.raises(ValueError, match="role 'w' for pattern 'fc' is not one of"):
        WeSaR(role_map={'fc': 'w'})
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid regex"):
        WeSaR(role_map={'(': 'u'})


def test_model_with_no_matrix_to_gate():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3)
            self.config = type('Cfg', (), {'d_model': 4, 'n_layers': 1, 'to_dict': lambda self: {}})()

    model = Conv()
    before = snapshot(model)
    with pytest.raises(ValueError, match='wesar: no weight matrix of Conv matched a role; nothing to change'):
        apply_wesar(model)
    assert_unchanged(model, before)


def test_applying_twice():
    model = apply_wesar(mpt(n_layers=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match='wesar is already applied to this model'):
        apply_wesar(model)
    assert_unchanged(model, before)


def test_user_role_map_extends_to_other_names():
    """A role map from the YAML gates an architecture the default map does not know."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(8, 32, bias=False)
            self.c_proj = nn.Linear(32, 8, bias=False)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([Block(), Block()])
            self.config = type('Cfg', (), {'n_embd': 8, 'n_layer': 2, 'to_dict': lambda self: {}})()

    model = apply_wesar(Tiny(), role_map={r'\.c_fc$': 'u', r'\.c_proj$': 'd'})
    down = model.h[1].c_proj
    assert down.roles == ('d',)
    assert down.gate.item() == pytest.approx(math.sqrt(2 / 32) / math.sqrt(4) / math.sqrt(4e-5), rel=1e-6)


def test_refuses_a_model_another_method_already_changed():
    from wesar_composer import apply_paper_init

    model = apply_paper_init(mpt(n_layers=2), backbone='small')
    before = snapshot(model)
    with pytest.raises(
        ValueError, match='wesar is an alternative to paper_init, not an addition: this model already has paper_init'
    ):
        apply_wesar(model)
    assert_unchanged(model, before)
