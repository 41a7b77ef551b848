"""The statistics of ``wesar-experiments``' analyses: means, paired differences with their tests, basins.

Shared by :mod:`~.tables`, :mod:`~.study` and :mod:`~.ablation`; it imports none of them.

- :class:`Paired`: differences of two arms' validation losses run by run, paired by seed (the seed
  fixes the data order and the virtual initialization, so seed effects cancel in the difference);
  mean, SE, t, two-sided 95% interval, and the equivalence test (TOST: two one-sided tests at 5%, so
  equivalence within a margin m holds when the 90% interval lies inside (-m, m)).
- :func:`basin` and :func:`sensitivity`: the width of the learning rates within a loss tolerance of
  the best, and the mean excess loss, both on a log learning-rate axis with the losses linearly
  interpolated between measured points, over a range every compared arm covers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

__all__ = ['mean_sd', 't_quantile', 'Paired', 'basin', 'sensitivity', 'EQUIVALENCE_MARGIN']

EQUIVALENCE_MARGIN = 0.01  # nats: about 1% perplexity; the ablation's margin, stated before its runs


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite ``values``."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan'), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


# Student's t quantiles for 1 to 30 degrees of freedom (0.95 and 0.975); the normal's beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)  # fmt: skip
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(p: float, df: int) -> float:
    """The ``p`` (0.95 or 0.975) quantile of Student's t with ``df`` degrees of freedom."""
    table = {0.95: (_T95, 1.645), 0.975: (_T975, 1.960)}[p]
    if df < 1:
        return float('nan')
    return table[0][df - 1] if df <= len(table[0]) else table[1]


@dataclass
class Paired:
    """Differences a - b of paired runs (same seed; the pairing rule is the caller's)."""

    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else float('nan')

    @property
    def se(self) -> float:
        return statistics.stdev(self.diffs) / math.sqrt(self.n) if self.n > 1 else float('nan')

    @property
    def t(self) -> float:
        return self.mean / self.se if self.se > 0 else float('nan')

    @property
    def lower(self) -> int:
        """How many pairs have a below b."""
        return sum(d < 0 for d in self.diffs)

    def interval(self, p: float) -> tuple[float, float]:
        half = t_quantile(p, self.n - 1) * self.se
        return self.mean - half, self.mean + half

    def equivalent(self, margin: float) -> bool:
        """TOST at 5%: the 90% interval inside (-margin, margin)."""
        lo, hi = self.interval(0.95)
        return self.n >= 3 and self.se > 0 and -margin < lo and hi < margin

    def different(self) -> bool:
        """The two-sided 95% interval excludes 0."""
        lo, hi = self.interval(0.975)
        return self.n >= 3 and self.se > 0 and (hi < 0 or lo > 0)

    def verdict(self, margin: float, a: str, b: str) -> str:
        """One of: a lower / a higher (95% interval off 0), equivalent within the margin (TOST), both (a
        difference inside the margin), or cannot decide (too few pairs, or neither test passes)."""
        if self.n < 3 or not math.isfinite(self.se):
            return f'Cannot decide: {self.n} pairs (3 needed).'
        if self.se == 0:
            return 'Cannot decide: the pairs do not vary (no SE).'
        if self.equivalent(margin) and self.different():
            side = 'lower' if self.mean < 0 else 'higher'
            return f'{a} is {side} than {b}, by less than the {margin:g}-nat margin.'
        if self.equivalent(margin):
            return f'{a} and {b} are equivalent within ±{margin:g} nats.'
        if self.different():
            return f'{a} reaches a {"lower" if self.mean < 0 else "higher"} loss than {b}.'
        return f'Cannot decide: neither different from 0 nor within ±{margin:g} nats.'

    def __str__(self) -> str:
        if not self.n:
            return 'no pairs'
        lo, hi = self.interval(0.975)
        return (
            f'{self.mean:+.4f} ± {self.se:.4f} (t {self.t:+.1f}, {self.n} pairs, {self.lower} lower; '
            f'95% CI {lo:+.4f} to {hi:+.4f})'
        )


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f'{x} outside [{xs[0]}, {xs[-1]}]')


def _clip(xs: Sequence[float], ys: Sequence[float], lo: float, hi: float) -> tuple[list[float], list[float]]:
    """The piecewise-linear curve (xs, ys) on [lo, hi]: its points inside, and the two ends interpolated."""
    inside = [(x, y) for x, y in zip(xs, ys) if lo < x < hi]
    pts = [(lo, _interp(xs, ys, lo)), *inside, (hi, _interp(xs, ys, hi))]
    return [p[0] for p in pts], [p[1] for p in pts]


def basin(
    xs: Sequence[float], ys: Sequence[float], tolerance: float, span: Optional[tuple[float, float]] = None
) -> tuple[float, bool]:
    """Width on the x axis (decades, with x = log10 lr) of the interval around the lowest point where
    the interpolated loss stays within ``tolerance`` of it, inside ``span`` (default: every x); and
    whether it reaches an end of that span (then the true basin may be wider)."""
    lo, hi = span if span else (xs[0], xs[-1])
    px, py = _clip(xs, ys, lo, hi)
    i = min(range(len(py)), key=lambda j: py[j])
    level = py[i] + tolerance
    left, right, at_edge = px[i], px[i], False
    j = i
    while j > 0 and py[j - 1] <= level:
        j -= 1
    if j == 0:
        left, at_edge = px[0], True
    else:  # crossing between j - 1 (above) and j (below)
        left = px[j - 1] + (level - py[j - 1]) * (px[j] - px[j - 1]) / (py[j] - py[j - 1])
    j = i
    while j < len(py) - 1 and py[j + 1] <= level:
        j += 1
    if j == len(py) - 1:
        right, at_edge = px[-1], True
    else:
        right = px[j] + (level - py[j]) * (px[j + 1] - px[j]) / (py[j + 1] - py[j])
    return right - left, at_edge


def sensitivity(
    xs: Sequence[float], ys: Sequence[float], cap: float, span: Optional[tuple[float, float]] = None
) -> float:
    """Mean over ``span`` (log lr) of min(loss, cap) minus the lowest loss in it, the loss interpolated
    linearly between points: Wortsman et al.'s LR sensitivity over a common range."""
    lo, hi = span if span else (xs[0], xs[-1])
    px, py = _clip(xs, [min(y, cap) for y in ys], lo, hi)
    best = min(py)
    area = sum((x1 - x0) * ((y0 + y1) / 2 - best) for x0, x1, y0, y1 in zip(px, px[1:], py, py[1:]))
    return area / (hi - lo) if hi > lo else float('nan')
