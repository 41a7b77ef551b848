"""SpikeGuard: one batch's loss blown up after ordinary batches is caught inside the optimizer step.

With ``action: skip`` the parameters and the whole optimizer state after that batch are bitwise
those before it, and training goes on to the end; ``log`` lets the step happen, ``stop`` ends the
run after ``max_skips`` skipped batches, naming them; bad values are refused when it is built.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from tests.common import TokenBatches, mpt
from wesar_composer import SpikeGuard, UpdateRatioMonitor, WeSaR
from wesar_composer.callbacks.spike_guard import SKIPPED_COLUMNS, SKIPPED_TABLE

BAD = 5  # 0-based index of the batch whose loss is blown up
BLOW_UP = 100.0
GUARD_LOG = 'wesar_composer.callbacks.spike_guard'


class BlowUp(Callback):
    """Multiplies the loss of the batches ``bad`` (0-based) by BLOW_UP before the backward pass."""

    def __init__(self, bad=(BAD,)):
        self.bad = set(bad)

    def after_loss(self, state, logger):
        if state.timestamp.batch.value in self.bad:
            state.loss = state.loss * BLOW_UP


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _same(a, b) -> bool:
    """Bitwise equality of nested tensors, numbers and containers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class Snapshots(Callback):
    """Parameters and optimizer state before and after every batch."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _take(self, state):
        params = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        return params, _clone(state.optimizers[0].state_dict())

    def batch_start(self, state, logger):
        self.before[state.timestamp.batch.value] = self._take(state)

    def batch_end(self, state, logger):
        self.after[state.timestamp.batch.value - 1] = self._take(state)


def fit(guard, batches=9, bad=(BAD,), gated=True, optimizer='adamw', microbatch=None, monitor=None):
    model = mpt(d_model=64, n_layers=2)
    if optimizer == 'adamw':
        opt = DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-5)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    snapshots, memory = Snapshots(), InMemoryLogger()
    callbacks = [guard, BlowUp(bad), snapshots] + ([monitor] if monitor else [])
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TokenBatches(n=128), batch_size=4),
        optimizers=opt,
        max_duration=f'{batches}ba',
        algorithms=[WeSaR()] if gated else [],
        callbacks=callbacks,
        loggers=[memory],
        device='cpu',
        seed=17,
        device_train_microbatch_size=microbatch or 4,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    return trainer, snapshots, memory


@pytest.mark.parametrize(
    'gated,optimizer,microbatch',
    [(True, 'adamw', None), (False, 'sgd', 2)],
    ids=['wesar-adamw', 'plain-sgd-momentum-accumulation'],
)
def test_skip_leaves_parameters_and_optimizer_state_bitwise_and_training_goes_on(gated, optimizer, microbatch):
    guard = SpikeGuard(action='skip', min_history=3)
    trainer, snaps, memory = fit(guard, gated=gated, optimizer=optimizer, microbatch=microbatch)
    assert trainer.state.timestamp.batch.value == 9  # went on to the end
    params_before, opt_before = snaps.before[BAD]
    params_after, opt_after = snaps.after[BAD]
    assert _same(params_before, params_after)
    assert _same(opt_before, opt_after)
    assert opt_before['state']  # the optimizer had state (moments, step counts) to keep
    for batch in (BAD - 1, BAD + 1):  # the ordinary batches around it did step
        assert not _same(snaps.before[batch][0], snaps.after[batch][0])
        assert not _same(snaps.before[batch][1], snaps.after[batch][1])
    assert guard.skipped == 1 and guard.outliers == 1
    assert [r['batch'] for r in guard.skipped_batches] == [BAD + 1]  # counted after the batch, as the monitor's steps
    assert (guard.skipped_batches[0]['first_sample_in_epoch'], guard.skipped_batches[0]['last_sample_in_epoch']) == (
        4 * BAD,
        4 * BAD + 3,
    )
    losses = [v for _, v in memory.data['loss/train/total']]
    assert losses[BAD] > 20 * losses[BAD - 1]  # the batch really was an outlier
    assert 'SpikeGuard' not in trainer.state.optimizers[0].step.__qualname__  # the wrapper is gone after fit


def test_the_closure_may_return_a_float_or_a_tensor():
    guard = SpikeGuard(min_history=2)
    for loss in (6.0, torch.tensor([6.1]), 6.05):
        assert guard._decide(loss)
    assert not guard._decide(torch.tensor([60.0]))
    assert list(guard.loss_detector.values) == pytest.approx([6.0, 6.1, 6.05])


def test_log_lets_the_step_happen():
    guard = SpikeGuard(action='log', min_history=3)
    _, snaps, memory = fit(guard)
    assert not _same(snaps.before[BAD][0], snaps.after[BAD][0])
    assert guard.skipped == 0 and guard.outliers == 1
    assert [v for _, v in memory.data['spike_guard/skipped']] == [0] * 9
    assert [v for _, v in memory.data['spike_guard/outliers']][BAD - 1 : BAD + 1] == [0, 1]


def test_without_an_outlier_nothing_is_skipped_and_the_steps_are_those_of_a_run_without_guard():
    _, with_guard, _ = fit(SpikeGuard(min_history=3), bad=())
    _, without, _ = fit(Callback(), bad=())
    assert _same(with_guard.after[8][0], without.after[8][0])


def test_stop_ends_the_run_after_max_skips_naming_the_batches(caplog):
    guard = SpikeGuard(action='stop', max_skips=2, min_history=3)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        trainer, _, memory = fit(guard, batches=12, bad=(BAD, BAD + 2))
    assert trainer.state.timestamp.batch.value == BAD + 3  # stopped after the second skipped batch
    assert guard.skipped == 2
    stop = [r for r in caplog.records if 'stopping training' in r.getMessage()]
    assert len(stop) == 1 and stop[0].levelname == 'ERROR'
    assert f'batches {BAD + 1}, {BAD + 3}.' in stop[0].getMessage() and 'max_skips=2' in stop[0].getMessage()
    table = json.loads(memory.tables[SKIPPED_TABLE])
    assert table['columns'] == SKIPPED_COLUMNS and [row[0] for row in table['data']] == [BAD + 1, BAD + 3]


def test_logged_keys_and_the_post_mortem_line_beside_the_monitor(caplog):
    guard = SpikeGuard(min_history=3)
    monitor = UpdateRatioMonitor(log_interval=1)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        _, _, memory = fit(guard, monitor=monitor)
    assert {'spike_guard/skipped', 'spike_guard/outliers', 'spike_guard/loss_score'} <= set(memory.data)
    assert [v for _, v in memory.data['spike_guard/skipped']] == [0] * BAD + [1] * (9 - BAD)
    (line,) = [r.getMessage() for r in caplog.records if 'outlier' in r.getMessage()]
    assert line.startswith(f'batch {BAD + 1}: outlier, update skipped (1 skipped so far): loss ')
    assert f'Samples {4 * BAD}-{4 * BAD + 3} of epoch 0.' in line
    assert f'Update ratios at step {BAD} against the median of steps 1-{BAD - 1}:' in line
    assert memory.data['update_ratio/max'][BAD][1] == 0.0  # the skipped step moved nothing


def test_a_loss_that_stays_high_is_skipped_max_consecutive_times_then_the_guard_gives_way(caplog):
    guard = SpikeGuard(min_history=3, max_consecutive=2)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        _, snaps, _ = fit(guard, batches=10, bad=range(BAD, 10))
    assert [r['batch'] for r in guard.skipped_batches] == [BAD + 1, BAD + 2]  # then it steps again
    assert not _same(snaps.before[BAD + 2][0], snaps.after[BAD + 2][0])
    assert any(
        'max_consecutive=2' in r.getMessage() and 'update applied (action: skip)' in r.getMessage()
        for r in caplog.records
    )
    assert guard.skipped == 2  # the window started again at the new level: no outlier after it


def test_not_finite_loss_is_skipped_from_the_first_batch():
    class NaNFirst(Callback):
        def after_loss(self, state, logger):
            if state.timestamp.batch.value == 0:
                state.loss = state.loss * float('nan')

    guard = SpikeGuard()
    model = mpt(d_model=32, n_heads=2, n_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TokenBatches(n=8), batch_size=4),
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        max_duration='1ba',
        callbacks=[guard, NaNFirst()],
        device='cpu',
        progress_bar=False,
    )
    trainer.fit()
    assert guard.skipped == 1
    assert _same(before, {n: p.detach().clone() for n, p in model.named_parameters()})


def test_gradient_norm_rule_catches_a_gradient_blow_up_that_the_loss_does_not_show():
    class GradBlowUp(Callback):
        def after_backward(self, state, logger):
            if state.timestamp.batch.value == BAD:
                for p in state.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1e4)

    guard = SpikeGuard(grad_norm=True, min_history=3)
    model = mpt(d_model=32, n_heads=2, n_layers=1)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TokenBatches(n=64), batch_size=4),
        optimizers=torch.optim.SGD(model.parameters(), lr=1e-3),
        max_duration='8ba',
        callbacks=[GradBlowUp(), guard],  # the blow-up's after_backward runs before the guard reads the norm
        device='cpu',
        progress_bar=False,
    )
    trainer.fit()
    assert guard.skipped == 1 and 'gradient norm' in guard.skipped_batches[0]['reason']
    assert guard.skipped_batches[0]['batch'] == BAD + 1


def test_state_survives_a_checkpoint():
    guard = SpikeGuard(min_history=3)
    fit(guard)
    other = SpikeGuard(min_history=3)
    other.load_state_dict(guard.state_dict())
    assert list(other.loss_detector.values) == list(guard.loss_detector.values)
    assert other.skipped == 1 and list(other.skipped_batches) == list(guard.skipped_batches)


@pytest.mark.parametrize(
    'kwargs,message',
    [
        ({'action': 'kill'}, "spike_guard: action must be one of \\['log', 'skip', 'stop'\\], got 'kill'"),
        ({'rule': 'mean'}, "spike_guard: rule must be one of \\['zscore', 'ratio'\\], got 'mean'"),
        ({'threshold': 0}, 'spike_guard: threshold must be positive .*got 0'),
        ({'threshold': -2.0}, 'spike_guard: threshold must be positive .*got -2.0'),
        ({'threshold': float('nan')}, 'spike_guard: threshold must be a finite number, got nan'),
        ({'rule': 'ratio', 'threshold': 1.0}, 'spike_guard: threshold of the ratio rule must be above 1 .*got 1.0'),
        ({'window': 1}, 'spike_guard: window must be an integer >= 2, got 1'),
        ({'window': 8, 'min_history': 9}, 'spike_guard: min_history must be an integer from 2 to window=8, got 9'),
        ({'max_skips': 0, 'action': 'stop'}, 'spike_guard: max_skips must be an integer >= 1, got 0'),
        ({'max_skips': 3}, "spike_guard: max_skips applies to action 'stop' only; got max_skips=3 with action 'skip'"),
        ({'grad_norm': 'yes'}, "spike_guard: grad_norm must be true or false, got 'yes'"),
        ({'max_consecutive': 0}, 'spike_guard: max_consecutive must be an integer >= 1, got 0'),
        (
            {'max_consecutive': 3, 'action': 'log'},
            "spike_guard: max_consecutive applies to action 'skip' only; got max_consecutive=3 with action 'log'",
        ),
    ],
)
def test_bad_values_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeGuard(**kwargs)


def test_registered_for_llm_foundry_yamls():
    from llmfoundry.utils.builders import build_callback

    guard = build_callback('spike_guard', kwargs={'action': 'log'})
    assert isinstance(guard, SpikeGuard) and guard.action == 'log'
    with pytest.raises(TypeError, match=r"got unknown hyperparameter\(s\) \['actoin'\]; valid ones are \[.*'action'"):
        build_callback('spike_guard', kwargs={'actoin': 'log'})
