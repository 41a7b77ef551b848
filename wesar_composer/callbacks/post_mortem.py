"""The spike post-mortem: which matrices' update ratios rose before a bad batch, and how large they were.

The update-ratio monitor keeps, at each logging step, the update ratio of every matrix
(:meth:`UpdateRatioMonitor.ratio_rise` reads that history). When a spike callback flags batch
b, :func:`post_mortem_text` writes what happened before it: the matrices whose ratio rose most
at the last logged step before b over the median of the kept earlier steps, or plainly that
none rose, and the largest absolute update ratios (a ratio near 1 means one step replaced the
weights, whatever the rise). :func:`emit` puts such a line on the console on a line of its own,
with its level, even while Composer's progress bar is drawn.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ['LARGE_RATIO', 'RatioRise', 'emit', 'lr_phase', 'post_mortem_text', 'ratio_rise']

LARGE_RATIO = 0.1  # an update ratio from which the line notes that a ratio near 1 replaces the weights
NAMED_ABSOLUTE = 3  # largest absolute update ratios named in the line
CONSOLE_FORMAT = '%(asctime)s: %(levelname)s: %(name)s: %(message)s'


@dataclass
class RatioRise:
    """How much each matrix's update ratio rose by a given batch.

    ``rows`` are ``(key, rise, ratio, baseline)`` sorted by ``rise``, largest first: ``ratio`` is
    the update ratio at ``step`` (the last logged step before the batch asked about),
    ``baseline`` the median of its update ratios at ``baseline_steps`` (the logged steps before
    ``step`` still in the monitor's history) and ``rise = ratio / baseline``.
    """

    step: int
    baseline_steps: tuple[int, ...]
    rows: list[tuple[str, float, float, float]]

    def top(self, n: int) -> list[tuple[str, float, float, float]]:
        return self.rows[:n]

    def risen(self, n: int) -> list[tuple[str, float, float, float]]:
        """The first ``n`` rows whose update ratio rose (rise above 1)."""
        return [row for row in self.rows if row[1] > 1][:n]

    def largest(self, n: int) -> list[tuple[str, float, float, float]]:
        """The ``n`` rows with the largest update ratio at ``step``."""
        return sorted(self.rows, key=lambda row: -row[2] if not math.isnan(row[2]) else math.inf)[:n]

    @property
    def span(self) -> str:
        first, last = self.baseline_steps[0], self.baseline_steps[-1]
        return f'{first:,}-{last:,}' if len(self.baseline_steps) > 1 else f'{first:,}'


def ratio_rise(
    history: Sequence[tuple[int, list[float]]], keys: Sequence[str], before_batch: Optional[int] = None
) -> Optional[RatioRise]:
    """Each matrix's ratio at the last kept step before ``before_batch`` over its median at the kept steps before that.

    The loss of batch b is computed with the weights of steps 1 .. b-1, so the steps that can
    explain a spike at batch b are those before it. Steps that moved no weight at all (a
    learning rate of 0 in the first warmup steps, a batch the spike guard skipped) say nothing
    about a matrix's usual update and are left out. None when fewer than two steps remain.
    """
    entries = [(s, r) for s, r in history if (before_batch is None or s < before_batch) and any(x > 0 for x in r)]
    if len(entries) < 2:
        return None
    (step, latest), earlier = entries[-1], entries[:-1]
    rows = []
    for i, key in enumerate(keys):
        baseline = statistics.median(r[i] for _, r in earlier)
        ratio = latest[i]
        if baseline > 0:
            rise = ratio / baseline
        else:
            rise = math.inf if ratio > 0 else math.nan
        rows.append((key, rise, ratio, baseline))
    rows.sort(key=lambda row: (math.isnan(row[1]), -row[1] if not math.isnan(row[1]) else 0.0))
    return RatioRise(step=step, baseline_steps=tuple(s for s, _ in earlier), rows=rows)


def post_mortem_text(monitor: Any, batch: int, names: int) -> tuple[str, Optional[RatioRise]]:
    """The sentence on the update ratios before ``batch``, and the ranking behind it (None without two steps)."""
    if monitor is None:
        return ' (Add update_ratio_monitor to name the matrices whose update ratio rose.)', None
    rise = monitor.ratio_rise(before_batch=batch)
    if rise is None:
        return (
            f' Update ratios: fewer than two logged steps that moved weights before batch {batch:,} '
            f'(log_interval {monitor.log_interval}), nothing to compare.'
        ), None
    risen = rise.risen(names)
    against = f'step {rise.span}' if len(rise.baseline_steps) == 1 else f'the median of steps {rise.span}'
    head = f' Update ratios at step {rise.step:,} against {against}:'
    if risen:
        named = ', '.join(
            f'{key} from 0 to {ratio:.3g}' if math.isinf(value) else f'{key} x{value:.3g} ({ratio:.3g})'
            for key, value, ratio, _ in risen
        )
        head += f' rose most {named}.'
    else:
        key, value, _, _ = next((row for row in rise.rows if not math.isnan(row[1])), rise.rows[0])
        head += f' none rose (the largest change is {key} x{value:.3g}).'
    largest = rise.largest(NAMED_ABSOLUTE)
    head += ' Largest update ratios: ' + ', '.join(f'{key} {ratio:.3g}' for key, _, ratio, _ in largest)
    if largest and largest[0][2] >= LARGE_RATIO:
        head += ' (a ratio near 1 means the step replaced the weights)'
    return head + '.', rise


def lr_phase(lrs: Sequence[float]) -> str:
    """``' during warmup (learning rate 2e-02, still rising)'`` when the learning rate rose into this batch."""
    if len(lrs) >= 2 and lrs[-1] > lrs[-2]:
        return f' during warmup (learning rate {lrs[-1]:.3g}, still rising)'
    return ''


def emit(log: logging.Logger, level: int, message: str, destinations: Sequence[Any] = ()) -> None:
    """Log ``message`` on a console line of its own, with its level, beside a progress bar.

    With no handler configured anywhere (Python's last-resort handler prints the bare message),
    a stderr handler with time, level and logger name is added to ``log`` once. While a
    tqdm progress bar is drawn (Composer's ``ProgressBarLogger``), the bar is cleared, the line
    written and the bar drawn again, as ``tqdm.write`` does.
    """
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        log.addHandler(handler)
    if any(type(d).__name__ == 'ProgressBarLogger' for d in destinations):
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            log.log(level, message)
    else:
        log.log(level, message)
