"""Count loss spikes, so that runs can be compared by their number of spikes."""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from wesar_composer.callbacks.keys import LOSS_KEY
from wesar_composer.callbacks.post_mortem import emit, lr_phase, post_mortem_text
from wesar_composer.callbacks.spike_detection import SpikeDetector
from wesar_composer.callbacks.update_ratio_monitor import find_monitor
from wesar_composer.reparam.checks import CheckedHparams

log = logging.getLogger(__name__)

__all__ = ['LossSpikeCounter']

DEFAULT_WINDOW_SIZE = 50  # batches of recent loss whose median is the reference
DEFAULT_OUTLIER_MULTIPLIER = 1.5  # a spike: loss >= 1.5 x the reference (KillLossSpike kills at 2 x its mean)
DEFAULT_MIN_HISTORY = 3  # losses needed before detection starts: a median of 3 already ignores one outlier
DEFAULT_LOG_INTERVAL = 1
DEFAULT_NAME_MATRICES = 5  # matrices named in the post-mortem of a spike
KEPT_POST_MORTEMS = 100  # the last post-mortems kept in memory (all of them are logged)
POST_MORTEM_TABLE = 'loss_spike/update_ratio_rise_{count}'  # table name; MLflow stores it as <name>.json
POST_MORTEM_COLUMNS = ['spike', 'batch', 'rank', 'matrix', 'rise', 'update_ratio', 'baseline', 'step', 'baseline_steps']
OWNER = 'loss_spike_counter'


class LossSpikeCounter(CheckedHparams, Callback):
    """Counts loss spikes with a robust form of llm-foundry's ``KillLossSpike`` test; never stops a run unless asked.

    Rule, checked on every batch with the training loss averaged over ranks (so every rank
    agrees)::

        reference = median(last window_size non-outlier losses)
        outlier   = loss is not finite  or  loss >= outlier_multiplier * reference

    A spike is a run of consecutive outlier batches; it is counted once, on its first batch.
    ``KillLossSpike`` tests ``loss >= 2 x`` the mean of its window to stop runs whose loss stays
    high; to *count* spikes this callback differs in four stated ways: the default multiplier is
    1.5; the reference is a median, which one outlier cannot move; the window keeps only
    non-outlier losses (the reference stays at the level before the spike, so a long excursion
    counts once); and detection starts after ``min_history`` (3) losses rather than a full
    window, so a divergence in the first steps is caught where it starts. The test is
    :class:`~wesar_composer.callbacks.spike_detection.SpikeDetector`'s ``ratio`` rule, shared
    with :class:`SpikeGuard`.

    Each spike is written in the run's log as a warning on a line of its own (with the
    learning-rate phase: ``during warmup`` while the learning rate still rises), and when the
    run ends inside a spike, the log says that the loss did not come back (a divergence).

    Post-mortem: when a spike starts at batch b and an :class:`UpdateRatioMonitor` is among the
    callbacks, the counter names the ``name_matrices`` matrices whose update ratio rose most
    (the ratio at the monitor's last logged step before b over its median at the logged steps
    kept before that), or says that none rose, and the largest update ratios
    (:mod:`~wesar_composer.callbacks.post_mortem`). It logs the full ranking as a table
    ``loss_spike/update_ratio_rise_{n}`` through Composer's logger (``Logger.log_table``: an
    MLflow JSON artifact; ``wesar-plot`` draws it).

    +-------------------------------+---------------------------------------------------+
    | Key                           | Logged value                                      |
    +===============================+===================================================+
    | ``loss_spike/count``          | spikes so far                                     |
    | ``loss_spike/outlier_batches``| outlier batches so far                            |
    | ``loss_spike/ratio``          | loss / reference of this batch (once detecting)   |
    +-------------------------------+---------------------------------------------------+

    Args:
        window_size: number of recent non-outlier losses whose median is the reference (>= 2).
        outlier_multiplier: a loss at or above this multiple of the reference is an outlier (> 1).
        min_history: losses seen before detection starts (2 to ``window_size``). Default 3.
        log_interval: log every ``log_interval`` batches; detection runs on every batch.
        stop_after: ``None`` (default) never stops training; an integer n stops it
            (``state.stop_training()``, a normal end with checkpoints) when the n-th spike starts.
        name_matrices: matrices named in the log line of a spike's post-mortem (the table holds
            all of them); 0 turns the post-mortem off. Default 5.
    """

    def __init__(
        self,
        window_size: int = DEFAULT_WINDOW_SIZE,
        outlier_multiplier: float = DEFAULT_OUTLIER_MULTIPLIER,
        min_history: int = DEFAULT_MIN_HISTORY,
        log_interval: int = DEFAULT_LOG_INTERVAL,
        stop_after: Optional[int] = None,
        name_matrices: int = DEFAULT_NAME_MATRICES,
    ):
        if not _positive_int(window_size) or window_size < 2:
            raise ValueError(f'window_size must be an integer >= 2, got {window_size!r}.')
        if not _positive_int(log_interval):
            raise ValueError(f'log_interval must be a positive integer, got {log_interval!r}.')
        if not _positive_int(min_history) or not 2 <= min_history <= window_size:
            raise ValueError(
                f'min_history must be an integer from 2 to window_size={window_size}, got {min_history!r}.'
            )
        if (
            isinstance(outlier_multiplier, bool)
            or not isinstance(outlier_multiplier, (int, float))
            or not math.isfinite(outlier_multiplier)
            or outlier_multiplier <= 1
        ):
            raise ValueError(f'outlier_multiplier must be a finite number above 1, got {outlier_multiplier!r}.')
        if stop_after is not None and not _positive_int(stop_after):
            raise ValueError(f'stop_after must be None (never stop) or a positive integer, got {stop_after!r}.')
        if not (_positive_int(name_matrices) or (type(name_matrices) is int and name_matrices == 0)):
            raise ValueError(f'name_matrices must be an integer >= 0 (0: no post-mortem), got {name_matrices!r}.')
        self.window_size = window_size
        self.outlier_multiplier = float(outlier_multiplier)
        self.min_history = min_history
        self.log_interval = log_interval
        self.stop_after = stop_after
        self.name_matrices = name_matrices
        self.detector = SpikeDetector(OWNER, 'ratio', self.outlier_multiplier, window_size, min_history)
        self.post_mortems: deque[dict[str, Any]] = deque(maxlen=KEPT_POST_MORTEMS)  # spike, batch, step, rows
        self.count = 0
        self.outlier_batches = 0
        self.in_spike = False
        self.spike_started = False
        self.spike_length = 0  # batches of the current spike
        self._lrs: deque[float] = deque(maxlen=2)

    @property
    def window(self) -> deque[float]:
        """The recent non-outlier losses whose median is the reference."""
        return self.detector.values

    def batch_start(self, state: State, logger: Logger) -> None:
        if state.optimizers:
            self._lrs.append(float(state.optimizers[0].param_groups[0]['lr']))

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = train_loss(state, OWNER)
        ratio = self.update(loss)
        if self.spike_started:
            batch = state.timestamp.batch.value
            verdict = self.detector.check(loss)
            text, rise = (
                post_mortem_text(find_monitor(state), batch, self.name_matrices) if self.name_matrices else ('', None)
            )
            if rise is not None:
                self._record(logger, batch, rise)
            emit(
                log,
                logging.WARNING,
                f'batch {batch:,}: loss spike {self.count}{lr_phase(self._lrs)}: loss '
                f'{self.detector.describe(verdict, "non-outlier losses")}.{text}',
                logger.destinations,
            )
            if self.stop_after is not None and self.count >= self.stop_after:
                emit(
                    log,
                    logging.WARNING,
                    f'batch {batch:,}: stopping training: {self.count} loss spikes (stop_after={self.stop_after}).',
                    logger.destinations,
                )
                state.stop_training()
        if state.timestamp.batch.value % self.log_interval != 0:
            return
        metrics = {'loss_spike/count': self.count, 'loss_spike/outlier_batches': self.outlier_batches}
        if ratio is not None:
            metrics['loss_spike/ratio'] = ratio
        logger.log_metrics(metrics)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.in_spike:
            emit(
                log,
                logging.WARNING,
                f'batch {state.timestamp.batch.value:,}: the run ended inside loss spike {self.count}, '
                f'{self.spike_length} batches long: the loss did not come back (a divergence).',
                logger.destinations,
            )

    def _record(self, logger: Logger, batch: int, rise: Any) -> None:
        """Keep the post-mortem and log its whole ranking as a table."""
        rows = [
            [self.count, batch, rank, key, value, ratio, baseline, rise.step, rise.span]
            for rank, (key, value, ratio, baseline) in enumerate(rise.rows, start=1)
        ]
        self.post_mortems.append(
            {
                'spike': self.count,
                'batch': batch,
                'step': rise.step,
                'baseline_steps': list(rise.baseline_steps),
                'rows': rise.rows,
            }
        )
        logger.log_table(POST_MORTEM_COLUMNS, rows, name=POST_MORTEM_TABLE.format(count=self.count), step=batch)

    def update(self, loss: float) -> Optional[float]:
        """Feed one loss; returns loss / reference once detection has started (else None)."""
        verdict = self.detector.update(loss)
        ratio = verdict.score  # None before min_history losses; inf for a loss that is not finite
        self.spike_started = False
        if verdict.outlier:
            self.outlier_batches += 1
            self.spike_started = not self.in_spike
            self.count += int(self.spike_started)
            self.spike_length = 1 if self.spike_started else self.spike_length + 1
            self.in_spike = True
        else:
            self.in_spike = False
        return ratio

    def state_dict(self) -> dict[str, Any]:
        return {
            'count': self.count,
            'outlier_batches': self.outlier_batches,
            'in_spike': self.in_spike,
            'window': list(self.window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state['count']
        self.outlier_batches = state['outlier_batches']
        self.in_spike = state['in_spike']
        self.detector.load_state_dict({'values': state['window']})


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def train_loss(state: State, owner: str) -> float:
    """The training loss of the batch, averaged over ranks (Composer's ``loss/train/total``)."""
    total = getattr(state, 'total_loss_dict', None) or {}
    if LOSS_KEY in total:
        return float(total[LOSS_KEY])
    loss = state.loss
    if isinstance(loss, torch.Tensor):
        return loss.item()
    raise ValueError(f'{owner} needs a single training loss; got {type(loss).__name__}.')
