"""LossSpikeCounter: the stated rule on scripted losses, in a real Trainer, and its stop switch."""

import math

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wesar_composer import LossSpikeCounter

N_BATCHES = 90
SPIKES = {30: 1.8, 50: 2.0, 51: 2.2, 52: 1.7, 70: float('nan')}  # batch index -> multiple of the base loss


def scripted_losses():
    """A slowly falling, slightly noisy loss with three spikes: one batch, three batches, and a NaN."""
    losses = [4.0 - 0.01 * i + 0.05 * math.sin(1.7 * i) for i in range(N_BATCHES)]
    for i, factor in SPIKES.items():
        losses[i] = losses[i] * factor
    return losses


def test_counts_each_run_of_outliers_once():
    counter = LossSpikeCounter()
    counts = []
    for loss in scripted_losses():
        counter.update(loss)
        counts.append(counter.count)
    assert counter.count == 3
    assert counter.outlier_batches == len(SPIKES)
    assert counts[29] == 0 and counts[30] == 1 and counts[50] == counts[52] == 2 and counts[70] == 3


def test_threshold_is_the_multiple_of_the_mean_of_the_window():
    def primed():
        counter = LossSpikeCounter(window_size=4, min_history=4, outlier_multiplier=1.5)
        for loss in (2.0, 4.0, 2.0, 4.0):  # reference 3.0
            counter.update(loss)
        return counter

    below, at = primed(), primed()
    assert below.update(4.49) == pytest.approx(4.49 / 3.0) and below.count == 0
    assert at.update(4.5) == pytest.approx(1.5) and at.count == 1


def test_reference_keeps_the_level_before_a_long_spike():
    """A 30-batch excursion to 2x is one spike; the loss coming back down is not another."""
    counter = LossSpikeCounter(window_size=20)
    losses = [3.0] * 20 + [6.0] * 30 + [3.0] * 20 + [6.0] * 2
    for loss in losses:
        counter.update(loss)
    assert counter.count == 2 and counter.outlier_batches == 32


def test_no_detection_before_min_history():
    counter = LossSpikeCounter(min_history=10)
    for loss in [1.0] * 9 + [100.0]:
        assert counter.update(loss) is None
    assert counter.count == 0
    assert counter.update(100.0) > 1.5 and counter.count == 1


def test_nan_loss_counts_as_a_spike_even_early():
    counter = LossSpikeCounter()
    counter.update(3.0)
    counter.update(float('nan'))
    assert counter.count == 1


class ScriptedLossModel(ComposerModel):
    """A model whose training loss is read from a script, one value per batch."""

    def __init__(self, losses):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.losses = losses
        self.batch = 0

    def forward(self, batch):
        return batch

    def loss(self, outputs, batch):
        value = self.losses[self.batch]
        self.batch += 1
        return self.weight.sum() * 0.0 + value


def fit(counter, batches=N_BATCHES):
    logger = InMemoryLogger()
    model = ScriptedLossModel(scripted_losses())
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(torch.zeros(N_BATCHES, 1)), batch_size=1),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        max_duration=f'{batches}ba',
        callbacks=[counter],
        loggers=[logger],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer, logger.data


def test_in_a_trainer_logs_the_running_count_and_never_stops():
    counter = LossSpikeCounter(log_interval=5)
    trainer, data = fit(counter)
    assert trainer.state.timestamp.batch.value == N_BATCHES
    steps = [t.batch.value for t, _ in data['loss_spike/count']]
    assert steps == list(range(5, N_BATCHES + 1, 5))
    counts = dict(zip(steps, [v for _, v in data['loss_spike/count']]))
    assert counts[30] == 0 and counts[35] == 1 and counts[55] == 2 and counts[N_BATCHES] == 3
    assert data['loss_spike/outlier_batches'][-1][1] == len(SPIKES)
    assert counter.state_dict()['count'] == 3


def test_stops_only_when_asked():
    trainer, data = fit(LossSpikeCounter(stop_after=2))
    assert trainer.state.timestamp.batch.value == 51  # the batch (1-based) on which the second spike starts
    assert data['loss_spike/count'][-1][1] == 2


def test_state_dict_round_trip():
    counter = LossSpikeCounter()
    for loss in scripted_losses()[:60]:
        counter.update(loss)
    resumed = LossSpikeCounter()
    resumed.load_state_dict(counter.state_dict())
    for loss in scripted_losses()[60:]:
        counter.update(loss)
        resumed.update(loss)
    assert resumed.state_dict() == counter.state_dict()


@pytest.mark.parametrize(
    'kwargs,message',
    [
        ({'outlier_multiplier': 1.0}, 'outlier_multiplier must be a finite number above 1, got 1.0'),
        ({'outlier_multiplier': float('inf')}, 'outlier_multiplier must be a finite number above 1, got inf'),
        ({'window_size': 0}, 'window_size must be an integer >= 2, got 0'),
        ({'window_size': 1}, 'window_size must be an integer >= 2, got 1'),
        ({'min_history': 60}, 'min_history must be an integer from 2 to window_size=50, got 60'),
        ({'log_interval': 2.5}, 'log_interval must be a positive integer, got 2.5'),
        ({'stop_after': 0}, 'stop_after must be None .never stop. or a positive integer, got 0'),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSpikeCounter(**kwargs)
