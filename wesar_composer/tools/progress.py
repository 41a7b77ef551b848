"""The progress callback of the tools' runs: one console line every few batches and after each evaluation.

Registered with llm-foundry as ``wesar_demo_progress`` (:func:`register_progress_callback`) so
that a YAML's ``callbacks`` can name it; its lines go through :func:`console.say`, to the
console, while the run's own output goes to its log file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Optional

from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger

from wesar_composer.callbacks import LossSpikeCounter
from wesar_composer.callbacks.keys import LOSS_KEY
from wesar_composer.tools.console import DEFAULT_TAG, say

__all__ = ['PROGRESS_CALLBACK', 'PROGRESS_INTERVAL', 'DemoProgress', 'register_progress_callback', 'spike_count']

PROGRESS_CALLBACK = 'wesar_demo_progress'
PROGRESS_INTERVAL = 10  # batches between progress lines


class DemoProgress(Callback):
    """One line every ``interval`` batches and after each evaluation: loss, lr, spikes, time left.

    Lines read ``[tag] label: batch 10/300 loss ...`` on the console.
    """

    def __init__(self, label: str = '', interval: int = PROGRESS_INTERVAL, tag: str = DEFAULT_TAG):
        self.label = label
        self.interval = interval
        self.tag = tag
        self._start: Optional[float] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch.value
        max_duration = state.max_duration
        total = max_duration.value if max_duration is not None and max_duration.unit == TimeUnit.BATCH else None
        if batch % self.interval != 0 and batch != total:
            return
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        per_batch = elapsed / max(batch, 1)
        loss = state.total_loss_dict.get(LOSS_KEY)
        lr = state.optimizers[0].param_groups[0]['lr'] if state.optimizers else float('nan')
        spikes = spike_count(state.callbacks)
        say(
            f'{self.label}: batch {batch}/{total or "?"}'
            + (f' loss {float(loss):.3f}' if loss is not None else '')
            + f' lr {lr:.2e}'
            + (f' spikes {spikes}' if spikes is not None else '')
            + f' ({per_batch:.2f} s/batch'
            + (f', {per_batch * (total - batch) / 60:.1f} min left)' if total else ')'),
            self.tag,
        )

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get('eval', {})
        if 'LanguageCrossEntropy' in metrics:
            ce = float(metrics['LanguageCrossEntropy'].compute())
            say(
                f'{self.label}: eval at batch {state.timestamp.batch.value}: '
                f'loss {ce:.3f}, perplexity {math.exp(ce):.1f}',
                self.tag,
            )


def spike_count(callbacks: Sequence[Callback]) -> Optional[int]:
    """The count of the run's ``loss_spike_counter``; None if the run has none."""
    return next((c.count for c in callbacks if isinstance(c, LossSpikeCounter)), None)


def register_progress_callback() -> None:
    """Register :class:`DemoProgress` with llm-foundry as ``wesar_demo_progress`` (once per process)."""
    from llmfoundry import registry

    if PROGRESS_CALLBACK not in registry.callbacks:
        registry.callbacks.register(PROGRESS_CALLBACK, func=DemoProgress)
