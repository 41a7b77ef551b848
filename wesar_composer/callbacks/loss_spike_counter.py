"""Count loss spikes, so that runs can be compared by their number of spikes."""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from wesar_composer.reparam.checks import CheckedHparams

log = logging.getLogger(__name__)

__all__ = ['LossSpikeCounter']

DEFAULT_WINDOW_SIZE = 50  # batches of recent loss that set the reference level
DEFAULT_OUTLIER_MULTIPLIER = 1.5  # a spike: loss >= 1.5 x the reference (KillLossSpike kills at 2 x)
DEFAULT_MIN_HISTORY = 10  # losses needed before detection starts
DEFAULT_LOG_INTERVAL = 1
DEFAULT_NAME_MATRICES = 5  # matrices named in the post-mortem of a spike
KEPT_POST_MORTEMS = 100  # the last post-mortems kept in memory (all of them are logged)
LOSS_KEY = 'loss/train/total'
POST_MORTEM_TABLE = 'loss_spike/update_ratio_rise_{count}'  # table name; MLflow stores it as <name>.json
POST_MORTEM_COLUMNS = ['spike', 'batch', 'rank', 'matrix', 'rise', 'update_ratio', 'baseline', 'step', 'baseline_steps']


class LossSpikeCounter(CheckedHparams, Callback):
    """Counts loss spikes with the outlier test of llm-foundry's ``KillLossSpike``; never stops a run unless asked.

    Rule, checked on every batch with the training loss averaged over ranks (so every rank
    agrees)::

        reference = mean(last window_size non-outlier losses)
        outlier   = loss is not finite  or  loss >= outlier_multiplier * reference

    A spike is a run of consecutive outlier batches; it is counted once, on its first batch.
    ``KillLossSpike`` uses the same test (``loss >= 2 x`` the mean of its window) to stop runs
    whose loss stays high; to *count* spikes this callback differs in three stated ways: the
    default multiplier is 1.5, the window keeps only non-outlier losses (the reference stays at
    the level before the spike, so a long excursion counts once), and detection starts after
    ``min_history`` losses rather than a full window (spikes early in training count too).

    Post-mortem: when a spike starts at batch b and an :class:`UpdateRatioMonitor` is among the
    callbacks, the counter names the ``name_matrices`` matrices whose update ratio rose most:
    the ratio at the monitor's last logged step before b over its median at the logged steps
    kept before that (:meth:`UpdateRatioMonitor.ratio_rise`). It writes them in the run's log
    (``Loss spike 1 at batch 1,234: ... rose most: L39/d x5.2, L38/d x4.9, ...``) and logs the
    full ranking as a table ``loss_spike/update_ratio_rise_{n}`` through Composer's logger
    (``Logger.log_table``: an MLflow JSON artifact; ``wesar-plot`` draws it).

    +-------------------------------+---------------------------------------------------+
    | Key                           | Logged value                                      |
    +===============================+===================================================+
    | ``loss_spike/count``          | spikes so far                                     |
    | ``loss_spike/outlier_batches``| outlier batches so far                            |
    | ``loss_spike/ratio``          | loss / reference of this batch (once detecting)   |
    +-------------------------------+---------------------------------------------------+

    Args:
        window_size: number of recent non-outlier losses whose mean is the reference.
        outlier_multiplier: a loss at or above this multiple of the reference is an outlier (> 1).
        min_history: losses seen before detection starts (1 to ``window_size``).
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
        for name, value in (('window_size', window_size), ('log_interval', log_interval)):
            if not _positive_int(value):
                raise ValueError(f'{name} must be a positive integer, got {value!r}.')
        if not _positive_int(min_history) or min_history > window_size:
            raise ValueError(
                f'min_history must be an integer from 1 to window_size={window_size}, got {min_history!r}.'
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
        self.post_mortems: deque[dict[str, Any]] = deque(
            maxlen=KEPT_POST_MORTEMS
        )  # spike, batch, step, baseline_steps, rows
        self.count = 0
        self.outlier_batches = 0
        self.in_spike = False
        self.spike_started = False
        self.window: deque[float] = deque(maxlen=window_size)

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = _train_loss(state)
        ratio = self.update(loss)
        if self.spike_started:
            batch = state.timestamp.batch.value
            log.warning(
                'Loss spike %d at batch %s: loss %.4g is %.3g x the recent mean.%s',
                self.count,
                f'{batch:,}',
                loss,
                ratio if ratio is not None else float('nan'),
                self._post_mortem(state, logger, batch) if self.name_matrices else '',
            )
            if self.stop_after is not None and self.count >= self.stop_after:
                log.warning('Stopping training: %d loss spikes (stop_after=%d).', self.count, self.stop_after)
                state.stop_training()
        if state.timestamp.batch.value % self.log_interval != 0:
            return
        metrics = {'loss_spike/count': self.count, 'loss_spike/outlier_batches': self.outlier_batches}
        if ratio is not None:
            metrics['loss_spike/ratio'] = ratio
        logger.log_metrics(metrics)

    def _post_mortem(self, state: State, logger: Logger, batch: int) -> str:
        """Name the matrices whose update ratio rose most before the spike; log the ranking as a table."""
        from wesar_composer.callbacks.update_ratio_monitor import UpdateRatioMonitor

        monitor = next((c for c in state.callbacks if isinstance(c, UpdateRatioMonitor)), None)
        if monitor is None:
            return ' (Add update_ratio_monitor to name the matrices whose update ratio rose.)'
        rise = monitor.ratio_rise(before_batch=batch)
        if rise is None:
            return (
                f' Update ratios: fewer than two logged steps before batch {batch:,} '
                f'(log_interval {monitor.log_interval}), nothing to compare.'
            )
        first, last = rise.baseline_steps[0], rise.baseline_steps[-1]
        span = f'{first:,}-{last:,}' if len(rise.baseline_steps) > 1 else f'{first:,}'
        rows = [
            [self.count, batch, rank, key, value, ratio, baseline, rise.step, span]
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
        named = ', '.join(f'{key} x{value:.3g}' for key, value, _, _ in rise.top(self.name_matrices))
        return f' Update ratios that rose most (step {rise.step:,} over the median of steps {span}): {named}.'

    def update(self, loss: float) -> Optional[float]:
        """Feed one loss; returns loss / reference once detection has started (else None)."""
        finite = math.isfinite(loss)
        ratio = None
        if len(self.window) >= self.min_history:
            reference = sum(self.window) / len(self.window)
            ratio = loss / reference if finite and reference > 0 else float('inf')
        self.spike_started = False
        if not finite or (ratio is not None and ratio >= self.outlier_multiplier):
            self.outlier_batches += 1
            self.spike_started = not self.in_spike
            self.count += int(self.spike_started)
            self.in_spike = True
        else:
            self.in_spike = False
            self.window.append(loss)
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
        self.window = deque(state['window'], maxlen=self.window_size)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _train_loss(state: State) -> float:
    """The training loss of the batch, averaged over ranks (Composer's ``loss/train/total``)."""
    total = getattr(state, 'total_loss_dict', None) or {}
    if LOSS_KEY in total:
        return float(total[LOSS_KEY])
    loss = state.loss
    if isinstance(loss, torch.Tensor):
        return loss.item()
    raise ValueError(f'LossSpikeCounter needs a single training loss; got {type(loss).__name__}.')
