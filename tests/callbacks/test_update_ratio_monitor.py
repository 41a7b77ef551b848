"""UpdateRatioMonitor in a real Composer Trainer: keys, interval, and the measured values."""

import math

import pytest
import torch
from composer.algorithms import GradientClipping
from composer.core import Callback
from composer.loggers import InMemoryLogger

from tests.common import cpu_trainer, llama, mpt
from wesar_composer import UpdateRatioMonitor, WeSaR
from wesar_composer.roles import find_matrices

N_LAYERS = 2
LAYER_ROLES = ('q', 'k', 'v', 'o', 'u', 'd')
FAMILIES = ('update_ratio', 'param_norm', 'grad_norm')
FULL = {'families': 'all', 'layers': 'all'}  # every key of every matrix
SUMMARIES = {'update_ratio/max', 'update_ratio/last_layer_d_over_u'} | {f'update_ratio/mean_{r}' for r in LAYER_ROLES}


def fit(model, callbacks, batches, optimizer=None, algorithms=()):
    logger = InMemoryLogger()
    trainer = cpu_trainer(
        model,
        optimizer=optimizer,
        max_duration=f'{batches}ba',
        algorithms=list(algorithms),
        callbacks=callbacks,
        loggers=[logger],
    )
    trainer.fit()
    trainer.close()
    return logger.data


def expected_keys(gated: bool, tied: bool) -> set:
    suffixes = [f'L{layer}/{role}' for layer in range(N_LAYERS) for role in LAYER_ROLES] + ['e']
    keys = {f'{family}/{s}' for family in FAMILIES for s in suffixes + ([] if tied else ['p'])}
    if gated:
        keys |= {f'gate/{s}' for s in suffixes + ['p']}  # a tied head has its own gate, but shares W_e
    return keys | SUMMARIES


def monitor_keys(data) -> set:
    return {k for k in data if k.split('/')[0] in FAMILIES + ('gate',)}


@pytest.mark.parametrize('gated,tied', [(True, False), (False, False), (True, True)])
def test_every_key_logged_at_the_interval_finite_and_positive(gated, tied):
    model = mpt(d_model=64, n_layers=N_LAYERS, tie_word_embeddings=tied)
    data = fit(model, [UpdateRatioMonitor(log_interval=2, **FULL)], batches=5, algorithms=[WeSaR()] if gated else [])
    assert monitor_keys(data) == expected_keys(gated, tied)
    for key in expected_keys(gated, tied):
        steps = [timestamp.batch.value for timestamp, _ in data[key]]
        assert steps == [2, 4], key
        values = [value for _, value in data[key]]
        assert all(math.isfinite(v) and v > 0 for v in values), (key, values)


class Spy(Callback):
    """Checks that the monitor holds no copy outside a logging batch, and records how much it copies."""

    def __init__(self, monitor):
        self.monitor, self.copied, self.idle_checks = monitor, [], 0

    def batch_start(self, state, logger):
        assert self.monitor._snapshot is None
        self.idle_checks += 1

    def after_train_batch(self, state, logger):  # runs after the monitor's own handler
        snapshot = self.monitor._snapshot
        if snapshot is not None:
            unique = {id(t): t for t in snapshot}
            self.copied.append((state.timestamp.batch.value + 1, sum(t.numel() for t in unique.values())))


def test_costs_nothing_off_interval_and_copies_the_weights_once(monkeypatch):
    model = mpt(d_model=64, n_layers=N_LAYERS, tie_word_embeddings=True)
    monitor = UpdateRatioMonitor(log_interval=3, families=['update_ratio', 'param_norm'])
    calls = []
    original = torch._foreach_norm
    monkeypatch.setattr(torch, '_foreach_norm', lambda *a, **k: calls.append(1) or original(*a, **k))
    spy = Spy(monitor)
    fit(model, [monitor, spy], batches=7, algorithms=[WeSaR()])
    weights = {id(s.module.weight): s.module.weight.numel() for s in find_matrices(model)}
    assert spy.copied == [(3, sum(weights.values())), (6, sum(weights.values()))]  # tied W_e copied once
    assert spy.idle_checks == 7 and monitor._snapshot is None
    assert len(calls) == 2 * 2  # weights and differences on each of the two logging batches: no grad_norm keys
    calls.clear()
    fit(mpt(d_model=64, n_layers=N_LAYERS), [UpdateRatioMonitor(log_interval=3, families='all')], batches=3)
    assert len(calls) == 3  # with grad_norm keys the gradients are read too


def test_default_reads_the_gradients_of_the_logged_matrices_only(monkeypatch):
    """``update_ratio_monitor: {}`` logs grad_norm/ keys, and reads no gradient of a layer it does not log."""
    model = mpt(d_model=64, n_layers=4)
    monitor = UpdateRatioMonitor(log_interval=1)
    read = []
    original = torch._foreach_norm
    monkeypatch.setattr(
        torch, '_foreach_norm', lambda t, *a, **k: read.append(sum(x.numel() for x in t)) or original(t, *a, **k)
    )
    data = fit(model, [monitor], batches=1)
    assert {k for k in data if k.startswith('grad_norm/')} == {
        f'grad_norm/{s}' for s in ['e', 'p'] + [f'L{layer}/{r}' for layer in (0, 3) for r in 'qkvoud']
    }
    weights, grads, diffs = read
    middle = sum(s.module.weight.numel() for s in find_matrices(model) if s.layer in (1, 2))
    assert weights == diffs and grads == weights - middle


def test_sgd_update_ratio_is_lr_times_clipped_grad_norm_over_param_norm():
    """Plain SGD: dW = -lr * g, so ||dW|| / ||W|| = lr * ||g|| / ||W||, with g the gradient after clipping."""
    lr, threshold = 0.05, 0.02
    model = mpt(d_model=64, n_layers=N_LAYERS)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    data = fit(
        model,
        [UpdateRatioMonitor(log_interval=1, **FULL)],
        batches=3,
        optimizer=optimizer,
        algorithms=[WeSaR(), GradientClipping(clipping_type='norm', clipping_threshold=threshold)],
    )
    suffixes = [k.removeprefix('update_ratio/') for k in data if k.startswith('update_ratio/') and k.count('/') >= 1]
    suffixes = [s for s in suffixes if f'update_ratio/{s}' not in SUMMARIES]
    assert len(suffixes) == N_LAYERS * len(LAYER_ROLES) + 2
    for step in range(3):
        total_sq = 0.0
        for s in suffixes:
            ratio = data[f'update_ratio/{s}'][step][1]
            grad_norm = data[f'grad_norm/{s}'][step][1]
            param_norm = data[f'param_norm/{s}'][step][1]
            assert ratio == pytest.approx(lr * grad_norm / param_norm, rel=1e-5), s
            total_sq += grad_norm**2
        assert math.sqrt(total_sq) <= threshold * (1 + 1e-5)  # the logged gradient is the clipped one


class WeightRecorder(Callback):
    """Copies every weight before and after the optimizer step of each batch."""

    def __init__(self):
        self.before, self.after = [], []

    def after_train_batch(self, state, logger):
        self.before.append({n: p.detach().clone() for n, p in state.model.named_parameters()})

    def batch_end(self, state, logger):
        self.after.append({n: p.detach().clone() for n, p in state.model.named_parameters()})


def test_wesar_ratios_match_weights_copied_by_hand():
    model = mpt(d_model=64, n_layers=N_LAYERS, kv_n_heads=2)  # GQA: k and v slices narrower than q
    recorder = WeightRecorder()
    data = fit(model, [UpdateRatioMonitor(log_interval=1, **FULL), recorder], batches=3, algorithms=[WeSaR()])
    checked = 0
    for spec in find_matrices(model):
        name = f'model.{spec.name}.weight'
        for step, (before, after) in enumerate(zip(recorder.before, recorder.after)):
            w_before, w_after = before[name].split(list(spec.slice_sizes)), after[name].split(list(spec.slice_sizes))
            for role, wb, wa in zip(spec.roles, w_before, w_after):
                key = role if spec.layer is None else f'L{spec.layer}/{role}'
                by_hand = ((wa - wb).norm() / wb.norm()).item()
                assert data[f'update_ratio/{key}'][step][1] == pytest.approx(by_hand, rel=1e-5), (key, step)
                assert data[f'param_norm/{key}'][step][1] == pytest.approx(wb.norm().item(), rel=1e-6)
                checked += 1
            for i, role in enumerate(spec.roles):  # gates are read before the step
                key = role if spec.layer is None else f'L{spec.layer}/{role}'
                gate = before[f'model.{spec.name}.gate'][i].item()
                assert data[f'gate/{key}'][step][1] == pytest.approx(gate, rel=1e-6)
    assert checked == 3 * (N_LAYERS * len(LAYER_ROLES) + 2)
    assert data['update_ratio/L1/d'][0][1] != data['update_ratio/L1/u'][0][1]
    d_over_u = [d[1] / u[1] for d, u in zip(data['update_ratio/L1/d'], data['update_ratio/L1/u'])]
    assert [v for _, v in data['update_ratio/last_layer_d_over_u']] == pytest.approx(d_over_u, rel=1e-9)
    maxima = [
        max(
            v[step][1]
            for k, v in data.items()
            if k.startswith('update_ratio/L') or k in ('update_ratio/e', 'update_ratio/p')
        )
        for step in range(3)
    ]
    assert [v for _, v in data['update_ratio/max']] == pytest.approx(maxima, rel=1e-9)
    for role in LAYER_ROLES:  # the mean over every layer of one role
        means = [
            sum(data[f'update_ratio/L{layer}/{role}'][step][1] for layer in range(N_LAYERS)) / N_LAYERS
            for step in range(3)
        ]
        assert [v for _, v in data[f'update_ratio/mean_{role}']] == pytest.approx(means, rel=1e-9), role


def test_first_logged_gates_are_the_wesar_initial_gates():
    model = mpt(d_model=64, n_layers=N_LAYERS)
    data = fit(model, [UpdateRatioMonitor(log_interval=1, families=['gate'])], batches=1, algorithms=[WeSaR()])
    sigma, d, n = math.sqrt(4e-5), 64, N_LAYERS
    table1 = {
        'q': math.sqrt(1 / d),
        'o': math.sqrt(1 / (2 * n * d)),
        'u': math.sqrt(1 / d),
        'd': math.sqrt(2 / (8 * n * d)),
    }
    for role, std in table1.items():
        assert data[f'gate/L1/{role}'][0][1] == pytest.approx(std / sigma, rel=1e-6), role
    assert data['gate/e'][0][1] == pytest.approx(1.0)


@pytest.mark.parametrize('bad', [0, -2, 1.5, True, '10', None])
def test_bad_log_interval_names_the_value(bad):
    with pytest.raises(ValueError, match=f'log_interval must be a positive integer.*{bad!r}'):
        UpdateRatioMonitor(log_interval=bad)


def test_bad_role_map_is_refused_before_training():
    with pytest.raises(ValueError, match="role 'z'"):
        UpdateRatioMonitor(role_map={r'fc$': 'z'})


def test_registered_as_llmfoundry_callback():
    from llmfoundry.utils.builders import build_callback

    from wesar_composer import LossSpikeCounter

    monitor = build_callback('update_ratio_monitor', kwargs={'log_interval': 5})
    assert isinstance(monitor, UpdateRatioMonitor) and monitor.log_interval == 5
    assert isinstance(build_callback('loss_spike_counter', kwargs={}), LossSpikeCounter)


def test_llama_style_hf_model_gets_the_same_layout_with_a_glu_gate_projection(tmp_path):
    model = llama(tmp_path, d_model=64, n_heads=4, kv_heads=2, n_layers=N_LAYERS)
    data = fit(model, [UpdateRatioMonitor(log_interval=1, **FULL)], batches=2, algorithms=[WeSaR()])
    suffixes = [f'L{layer}/{role}' for layer in range(N_LAYERS) for role in LAYER_ROLES + ('g',)] + ['e', 'p']
    expected = {f'{family}/{s}' for family in FAMILIES + ('gate',) for s in suffixes}
    assert monitor_keys(data) == expected | SUMMARIES | {'update_ratio/mean_g'}
    assert all(len(data[key]) == 2 and all(v > 0 and math.isfinite(v) for _, v in data[key]) for key in expected)


def test_update_ratio_monitor_from_an_empty_yaml_entry_logs_grad_norm_keys():
    """``update_ratio_monitor: {}`` in a YAML: gradient norms of the matrices it logs."""
    from llmfoundry.utils.builders import build_callback

    monitor = build_callback('update_ratio_monitor', kwargs={})
    monitor.log_interval = 1  # the default interval of 10 would log nothing in 2 batches
    data = fit(mpt(d_model=64, n_layers=N_LAYERS), [monitor], batches=2)
    grads = {k for k in data if k.startswith('grad_norm/')}
    assert grads == {f'grad_norm/{k}' for k in monitor.logged_keys}
    assert all(v > 0 for k in grads for _, v in data[k])
