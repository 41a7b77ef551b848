"""UpdateRatioMonitor's volume options: which families and layers get per-matrix keys, the
summaries, the defaults on a 40-layer model against the full view, and their validation."""

import pytest
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from tests.callbacks.test_update_ratio_monitor import LAYER_ROLES
from tests.common import TokenBatches, mpt
from wesar_composer import UpdateRatioMonitor, WeSaR

DEEP = 40
FAMILIES = ('update_ratio', 'param_norm', 'grad_norm', 'gate')
SUMMARIES = {'update_ratio/max', 'update_ratio/last_layer_d_over_u'} | {f'update_ratio/mean_{r}' for r in LAYER_ROLES}


def deep_model():
    return mpt(d_model=16, n_heads=2, n_layers=DEEP, vocab_size=128)


def keys_of_one_step(monitor, gated=True, model=None):
    """The keys the monitor logs on one step of a 40-layer MPT (d 16) in a Composer Trainer."""
    model = model or deep_model()
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TokenBatches(n=8, seq=16, vocab=128), batch_size=2),
        max_duration='1ba',
        algorithms=[WeSaR()] if gated else [],
        callbacks=[monitor],
        loggers=[logger],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    return {k for k in logger.data if k.split('/')[0] in FAMILIES}


def per_matrix(layers, families, roles=LAYER_ROLES):
    suffixes = [f'L{layer}/{role}' for layer in layers for role in roles] + ['e', 'p']
    return {f'{family}/{s}' for family in families for s in suffixes}


def test_defaults_on_40_layers_log_50_keys_a_step_against_976_for_the_full_view():
    default = keys_of_one_step(UpdateRatioMonitor(log_interval=1))
    assert default == per_matrix([0, DEEP - 1], ('update_ratio', 'param_norm', 'grad_norm')) | SUMMARIES
    assert len(default) == 3 * (2 * 6 + 2) + 8 == 50
    full = keys_of_one_step(UpdateRatioMonitor(log_interval=1, families='all', layers='all'))
    assert full == per_matrix(range(DEEP), FAMILIES) | SUMMARIES
    assert len(full) == 4 * (DEEP * 6 + 2) + 8 == 976
    # the dashboard's sections before loss/ in alphabetical order: grad_norm's only with the defaults
    assert {k.split('/')[0] for k in default if k.split('/')[0] < 'loss'} == {'grad_norm'}


def test_summaries_only():
    model = mpt(d_model=32, n_heads=2, n_layers=2, vocab_size=128)
    keys = keys_of_one_step(UpdateRatioMonitor(log_interval=1, families=[]), gated=False, model=model)
    assert keys == SUMMARIES


def selected(**kwargs):
    monitor = UpdateRatioMonitor(**kwargs)
    monitor.discover(deep_model())
    return {key for key in monitor.logged_keys if '/' in key}


@pytest.mark.parametrize(
    'layers,expected',
    [
        ([0, -1], [0, 39]),
        ([-2, 5, 5], [5, 38]),
        ('all', list(range(DEEP))),
        ({'every': 8}, [0, 8, 16, 24, 32, 39]),
        ({'every': 13}, [0, 13, 26, 39]),
        ([], []),
    ],
)
def test_layer_selection(layers, expected):
    assert selected(layers=layers) == {f'L{layer}/{role}' for layer in expected for role in LAYER_ROLES}


def test_a_layer_outside_the_model_is_refused_when_the_model_is_seen():
    with pytest.raises(
        ValueError, match=r'layers: 40 is outside the model, which has 40 layers \(0 to 39, or -40 to -1'
    ):
        selected(layers=[0, 40])
    with pytest.raises(ValueError, match='layers: -41 is outside the model'):
        selected(layers=[-41])


@pytest.mark.parametrize(
    'kwargs,message',
    [
        (
            {'families': 'update_ratio'},
            r"families must be 'all' or a list drawn from \['update_ratio', 'param_norm', 'grad_norm', 'gate'\], got 'update_ratio'",
        ),
        (
            {'families': ['update_ratios']},
            r"families: unknown family 'update_ratios'; choose from \['update_ratio', 'param_norm', 'grad_norm', 'gate'\] or 'all'",
        ),
        ({'families': ['gate', 'gate']}, r"families: \['gate', 'gate'\] names a family twice"),
        ({'families': 3}, r"families must be 'all' or a list .*got 3"),
        (
            {'layers': 'first'},
            r"layers must be 'all', a list of layer indices such as \[0, -1\], or \{'every': k\} with k >= 1, got 'first'",
        ),
        ({'layers': [0, 'last']}, r"layers: 'last' is not a layer index"),
        ({'layers': [0, 1.0]}, r'layers: 1.0 is not a layer index'),
        ({'layers': [True]}, r'layers: True is not a layer index'),
        ({'layers': {'every': 0}}, r"layers must be .*got \{'every': 0\}"),
        ({'layers': {'each': 2}}, r"layers must be .*got \{'each': 2\}"),
        ({'layers': 2}, r'layers must be .*got 2'),
        ({'summaries': 'yes'}, r"summaries must be true or false, got 'yes'"),
        ({'families': [], 'summaries': False}, r'families is empty and summaries is false: nothing would be logged'),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateRatioMonitor(**kwargs)


def test_options_from_an_llmfoundry_yaml():
    from llmfoundry.utils.builders import build_callback
    from omegaconf import OmegaConf as om

    cfg = om.create({'families': ['update_ratio'], 'layers': {'every': 4}, 'summaries': True})
    monitor = build_callback('update_ratio_monitor', kwargs=om.to_container(cfg))
    assert monitor.families == ('update_ratio',) and monitor.layers == {'every': 4}
    monitor = UpdateRatioMonitor(families=cfg.families, layers=cfg.layers)  # OmegaConf containers as they are
    assert monitor.families == ('update_ratio',) and monitor.layers == {'every': 4}
