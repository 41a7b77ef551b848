"""The outlier test of a running series (the batch loss, the gradient norm), shared by the spike callbacks.

Baseline: the median of the last ``window`` values that were not outliers, so that a spike does
not raise its own reference (a mean would). Two rules, each a published practice made robust:

- ``ratio``: outlier when ``value >= threshold * median`` (llm-foundry's ``KillLossSpike``
  tests ``loss >= 2 x`` the mean of its window of 100);
- ``zscore``: outlier when ``(value - median) / sigma >= threshold``, with the robust sigma
  ``1.4826 * MAD`` (the median absolute deviation, scaled to a normal's standard deviation),
  floored at ``SIGMA_FLOOR`` x the median so that a flat window does not turn noise into a
  spike (OLMo-core's ``SkipStepAdamW`` skips a step whose loss or gradient norm exceeds the
  window's mean by 6 standard deviations, over a window of 128 steps).

A value that is not finite is always an outlier, from the first batch. Before ``min_history``
values are in the window, finite values are accepted without a test.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ['RULES', 'SIGMA_FLOOR', 'SpikeDetector', 'Verdict', 'check_choice', 'check_positive_int']

RULES = ('zscore', 'ratio')
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution
SIGMA_FLOOR = 0.01  # the robust sigma is at least 1% of the median


def check_positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{owner}: {name} must be an integer >= {minimum}, got {value!r}.')
    return value


def check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f'{owner}: {name} must be one of {list(allowed)}, got {value!r}.')
    return value


@dataclass(frozen=True)
class Verdict:
    """One value tested against the window: ``score`` is the ratio or z-score (None before ``min_history``)."""

    value: float
    baseline: Optional[float]  # the median of the window
    score: Optional[float]
    outlier: bool


class SpikeDetector:
    """A window of recent non-outlier values and the outlier test against its median."""

    def __init__(self, owner: str, rule: str, threshold: float, window: int, min_history: int):
        check_choice(owner, 'rule', rule, RULES)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f'{owner}: threshold must be a finite number, got {threshold!r}.')
        if rule == 'ratio' and threshold <= 1:
            raise ValueError(
                f'{owner}: threshold of the ratio rule must be above 1 (a multiple of the median), got {threshold!r}.'
            )
        if threshold <= 0:
            raise ValueError(
                f'{owner}: threshold must be positive (standard deviations above the median), got {threshold!r}.'
            )
        check_positive_int(owner, 'window', window, minimum=2)
        if isinstance(min_history, bool) or not isinstance(min_history, int) or not 2 <= min_history <= window:
            raise ValueError(f'{owner}: min_history must be an integer from 2 to window={window}, got {min_history!r}.')
        self.rule = rule
        self.threshold = float(threshold)
        self.min_history = min_history
        self.values: deque[float] = deque(maxlen=window)

    def check(self, value: float) -> Verdict:
        """Test ``value`` against the window, leaving the window as it is."""
        if not math.isfinite(value):
            return Verdict(value, self.baseline(), math.inf, True)
        if len(self.values) < self.min_history:
            return Verdict(value, None, None, False)
        median = statistics.median(self.values)
        if self.rule == 'ratio':
            score = value / median if median > 0 else math.inf
        else:
            mad = statistics.median(abs(v - median) for v in self.values)
            sigma = max(MAD_TO_SIGMA * mad, SIGMA_FLOOR * abs(median))
            score = (value - median) / sigma if sigma > 0 else (math.inf if value > median else 0.0)
        return Verdict(value, median, score, score >= self.threshold)

    def update(self, value: float) -> Verdict:
        """Test ``value``; a value that is not an outlier joins the window."""
        verdict = self.check(value)
        if not verdict.outlier:
            self.values.append(value)
        return verdict

    def baseline(self) -> Optional[float]:
        return statistics.median(self.values) if self.values else None

    def describe(self, verdict: Verdict, noun: str = 'values') -> str:
        """``'12.6 is 1.9 x the median 6.7 of the last 5 values'`` or the z-score equivalent."""
        if not math.isfinite(verdict.value):
            return f'{verdict.value} is not finite'
        n = len(self.values)
        if verdict.score is None or verdict.baseline is None:
            return f'{verdict.value:.4g} (fewer than {self.min_history} {noun} seen)'
        if self.rule == 'ratio':
            return (
                f'{verdict.value:.4g} is {verdict.score:.3g} x the median {verdict.baseline:.4g} of the last {n} {noun}'
            )
        return (
            f'{verdict.value:.4g} is {verdict.score:.3g} robust standard deviations above the median '
            f'{verdict.baseline:.4g} of the last {n} {noun} ({verdict.value / verdict.baseline:.3g} x)'
            if verdict.baseline > 0
            else f'{verdict.value:.4g} is {verdict.score:.3g} robust standard deviations above the median {verdict.baseline:.4g}'
        )

    def state_dict(self) -> dict[str, Any]:
        return {'values': list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque(state['values'], maxlen=self.values.maxlen)
