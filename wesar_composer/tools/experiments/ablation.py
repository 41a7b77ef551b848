"""The ablation of ``wesar-experiments --groups ablation``: the gates, the clipping and the backbone separated.

From ``results.csv`` rows of group ``ablation`` (seven arms on one grid of lr / sigma at d 64, N 4,
8 and 16; ``docs/reproduction.md`` states the design and its decision rule): per shape and arm the
mean loss at each grid point, the best point, the largest attention logit there; the paired
comparisons of the rule with their verdicts (:class:`~.measures.Paired`); the interpolated basin
width and LR sensitivity over the range every arm covers.

Pairing: two arms with the same sigma (WeSaR, its fixed-gate version and the two gate-free twins)
are compared at the same learning rate, the grid point where the mean of the two arms' mean losses
is lowest; arms that differ in init or sigma are compared each at its own best point. Either way a
difference is taken run by run between runs of the same seed, and pooled over the three depths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from wesar_composer.tools.experiments.grid import ABLATION_ARMS, FULL, METHODS, SHAPES, ablation_k, arm_sigma
from wesar_composer.tools.experiments.measures import EQUIVALENCE_MARGIN, Paired, basin, mean_sd, sensitivity
from wesar_composer.tools.experiments.tables import best_in_bold, sweep_table

__all__ = ['AblationArm', 'summarize_ablation', 'ablation_decisions', 'render_ablation_tables', 'COMPARISONS']

L0 = math.log(FULL.vocab_size)  # a diverged run counts as a uniform prediction
BASIN_NATS = 0.1
BASIN_STEP = 0.125  # decades: half a grid step, the smallest basin difference the rule reads
MARGIN = EQUIVALENCE_MARGIN

# (a, b, question, same lr): the rule's paired comparisons, a - b
COMPARISONS = (
    ('wesar_width', 'wesar_width_fixed', 'Trained against fixed gates', True),
    ('wesar_width_fixed', 'matrix_lr', 'Clipping: fixed gates against the twin (clipping 1.0 for both)', True),
    (
        'wesar_width_fixed',
        'matrix_lr_clip',
        'Matched clipping: fixed gates against the twin clipped at sigma/s_r',
        True,
    ),
    ('wesar_width', 'matrix_lr', 'WeSaR against the twin', True),
    ('wesar_width', 'small_rapid', 'WeSaR against Small init, each at its best', False),
    ('wesar_width_small', 'wesar_width', 'Backbone: WeSaR on the Small backbone against the He backbone', False),
    ('small_od_lr', 'small_rapid', 'W_o / W_d at lr / sqrt(2N) against Small init', False),
)
SHORT = {
    'small_rapid': 'Small init',
    'wesar_width': 'WeSaR',
    'wesar_width_fixed': 'WeSaR (fixed gates)',
    'matrix_lr': 'the twin',
    'matrix_lr_clip': 'the matched-clipping twin',
    'small_od_lr': 'the W_o/W_d-lr arm',
    'wesar_width_small': 'WeSaR (Small backbone)',
}


@dataclass
class AblationArm:
    shape: str
    method: str
    ks: list[int]  # grid points: lr / sigma = 10^(k/4)
    losses: dict[int, dict[int, float]]  # k -> seed -> validation loss (diverged: ln(vocab), capped there)
    logits: dict[int, list[float]] = field(default_factory=dict)
    spiked_runs: int = 0
    runs: int = 0

    def mean(self, k: int) -> float:
        return mean_sd(list(self.losses[k].values()))[0]

    @property
    def best_k(self) -> int:
        return min(self.ks, key=lambda k: (self.mean(k), k))

    @property
    def best(self) -> float:
        return self.mean(self.best_k)

    @property
    def logit_at_best(self) -> float:
        return mean_sd(self.logits.get(self.best_k, []))[0]


def summarize_ablation(rows: list[dict]) -> dict[tuple[str, str], AblationArm]:
    out: dict[tuple[str, str], AblationArm] = {}
    sel = [r for r in rows if r['group'] == 'ablation']
    for shape in sorted({r['shape'] for r in sel}, key=lambda s: SHAPES[s]['n_layers'] if s in SHAPES else 0):
        for method in ABLATION_ARMS:
            runs = [r for r in sel if r['shape'] == shape and r['method'] == method]
            if not runs:
                continue
            arm = AblationArm(shape, method, [], {})
            for r in runs:
                k = ablation_k(method, r['d_model'], r['lr'])
                loss = r['val_loss'] if not r['diverged'] and math.isfinite(r['val_loss']) else L0
                arm.losses.setdefault(k, {})[r['seed']] = min(loss, L0)
                logit = r.get('max_attn_logit', float('nan'))
                arm.logits.setdefault(k, []).append(float('nan') if logit is None else float(logit))
                arm.spiked_runs += bool(r['spikes'])
                arm.runs += 1
            arm.ks = sorted(arm.losses)
            out[(shape, method)] = arm
    return out


def _shapes(summary) -> list[str]:
    return list(dict.fromkeys(s for s, _ in summary))


def _label(shape: str) -> str:
    dims = SHAPES.get(shape, {'d_model': '?', 'n_layers': '?'})
    return f'd {dims["d_model"]}, N {dims["n_layers"]}'


def pair_points(a: AblationArm, b: AblationArm, same_lr: bool) -> Optional[tuple[int, int]]:
    """The grid points at which ``a`` and ``b`` are compared: the common point with the lowest mean of
    their means (same_lr), or each one's best point."""
    if not same_lr:
        return a.best_k, b.best_k
    common = [k for k in a.ks if k in b.losses]
    if not common:
        return None
    k = min(common, key=lambda k: (a.mean(k) + b.mean(k), k))
    return k, k


def paired(summary, shape: str, a: str, b: str, same_lr: bool) -> Paired:
    x, y = summary.get((shape, a)), summary.get((shape, b))
    if x is None or y is None:
        return Paired([])
    points = pair_points(x, y, same_lr)
    if points is None:
        return Paired([])
    ka, kb = points
    seeds = sorted(set(x.losses[ka]) & set(y.losses[kb]))
    return Paired([x.losses[ka][s] - y.losses[kb][s] for s in seeds])


def matched_everywhere(summary, shape: str, a: str, b: str) -> Paired:
    """Every pair of runs of ``a`` and ``b`` at the same grid point and seed."""
    x, y = summary.get((shape, a)), summary.get((shape, b))
    if x is None or y is None:
        return Paired([])
    return Paired(
        [x.losses[k][s] - y.losses[k][s] for k in x.ks if k in y.losses for s in x.losses[k] if s in y.losses[k]]
    )


def common_span(summary, shape: str) -> Optional[tuple[float, float]]:
    """The log10(lr / sigma) range every arm at ``shape`` covers."""
    arms = [arm for (s, _), arm in summary.items() if s == shape]
    if not arms:
        return None
    lo, hi = max(min(a.ks) for a in arms) / 4, min(max(a.ks) for a in arms) / 4
    return (lo, hi) if hi > lo else None


def arm_basin(arm: AblationArm, span: tuple[float, float]) -> tuple[float, bool]:
    return basin([k / 4 for k in arm.ks], [arm.mean(k) for k in arm.ks], BASIN_NATS, span)


def arm_sensitivity(arm: AblationArm, span: tuple[float, float]) -> float:
    return sensitivity([k / 4 for k in arm.ks], [arm.mean(k) for k in arm.ks], L0, span)


def _pooled(summary, a: str, b: str, same_lr: bool) -> tuple[Paired, dict[str, Paired]]:
    per = {s: paired(summary, s, a, b, same_lr) for s in _shapes(summary)}
    return Paired([d for p in per.values() for d in p.diffs]), per


def _basin_line(summary, arm: str) -> str:
    """Decided: ``arm``'s basin against Small init's, per depth, in decades of the common range."""
    cells, wider, narrower, open_ = [], 0, 0, 0
    for shape in _shapes(summary):
        span = common_span(summary, shape)
        x, s = summary.get((shape, arm)), summary.get((shape, 'small_rapid'))
        if span is None or x is None or s is None:
            open_ += 1
            continue
        (bx, ex), (bs, es) = arm_basin(x, span), arm_basin(s, span)
        delta = bx - bs
        cells.append(f'{_label(shape)} {bx:.2f}{"+" if ex else ""} vs {bs:.2f}{"+" if es else ""}')
        if ex or es:
            open_ += 1
        elif delta >= BASIN_STEP:
            wider += 1
        elif delta <= -BASIN_STEP:
            narrower += 1
    n = len(_shapes(summary))
    if wider >= 2 and not narrower:
        verdict = f'Wider than Small init at {wider} of {n} depths.'
    elif narrower >= 2 and not wider:
        verdict = f'Narrower than Small init at {narrower} of {n} depths.'
    elif open_ > n - 2:
        verdict = (
            f'Cannot decide: the basin reaches the end of the common range (or is missing) at {open_} of {n} depths.'
        )
    else:
        verdict = 'No difference the grid separates.'
    return (
        f'Basin of {SHORT[arm]} (decades of lr within {BASIN_NATS} nats of the best; +: reaches the end of the '
        f'common range): {", ".join(cells) or "none"}. **{verdict}**'
    )


def ablation_decisions(summary) -> list[str]:
    """The decision rule of the ablation (docs/reproduction.md), applied; one line per question."""
    shapes = _shapes(summary)
    if not shapes:
        return ['No ablation runs yet.']
    lines = []
    for i, (a, b, question, same_lr) in enumerate(COMPARISONS, 1):
        pooled, per = _pooled(summary, a, b, same_lr)
        where = 'same lr' if same_lr else 'each at its best lr'
        depth = ', '.join(f'{_label(s)} {p.mean:+.4f} ({p.n})' if p.n else f'{_label(s)} -' for s, p in per.items())
        verdict = pooled.verdict(MARGIN, SHORT[a][0].upper() + SHORT[a][1:], SHORT[b])
        lines.append(f'{i}. {question} ({where}): {pooled}; by depth {depth}. **{verdict}**')
        if a == 'wesar_width' and b == 'small_rapid':
            first, last = per.get(shapes[0]), per.get(shapes[-1])
            if first and last and first.n > 1 and last.n > 1 and len(shapes) > 1:
                se = math.hypot(first.se, last.se)
                z = (last.mean - first.mean) / se if se > 0 else float('nan')
                trend = (
                    "the difference grows in WeSaR's favour with depth"
                    if z < -2
                    else 'the difference shrinks with depth'
                    if z > 2
                    else 'no change with depth beyond 2 SE'
                )
                lines[-1] += (
                    f' Depth: {_label(shapes[-1])} minus {_label(shapes[0])} {last.mean - first.mean:+.4f} ± {se:.4f}: **{trend}.**'
                )
    n = len(COMPARISONS)
    for j, arm in enumerate(('wesar_width', 'matrix_lr', 'small_od_lr', 'wesar_width_small'), n + 1):
        lines.append(f'{j}. {_basin_line(summary, arm)}')
    return lines


def table_ablation(summary) -> str:
    lines = [
        '| shape | arm | best lr / sigma | best lr | best loss (± SD, seeds) | LR sensitivity (common range) '
        '| basin (decades) | runs with a spike | max attention logit at best |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for (shape, method), arm in summary.items():
        span = common_span(summary, shape)
        k = arm.best_k
        m, sd, n = mean_sd(list(arm.losses[k].values()))
        d = SHAPES[shape]['d_model'] if shape in SHAPES else 64
        sens = f'{arm_sensitivity(arm, span):.3f}' if span else '-'
        width = arm_basin(arm, span) if span else None
        basin_text = f'{width[0]:.2f}{"+" if width[1] else ""}' if width else '-'
        lines.append(
            f'| {_label(shape)} | {METHODS[method][0]} | {10 ** (k / 4):.3g} | {10 ** (k / 4) * arm_sigma(method, d):.3g} '
            f'| {m:.3f} ± {sd:.3f} ({n}) | {sens} | {basin_text} | {arm.spiked_runs} / {arm.runs} | {arm.logit_at_best:.1f} |'
        )
    return '\n'.join(lines)


def table_ablation_sweep(summary) -> str:
    ks = sorted({k for arm in summary.values() for k in arm.ks})

    def cell(arm: AblationArm, k: int) -> str:
        if k not in arm.losses:
            return ''
        return best_in_bold(f'{arm.mean(k):.3f} ({len(arm.losses[k])})', k == arm.best_k)

    return sweep_table(
        [f'{10 ** (k / 4):.3g}' for k in ks],
        [(_label(shape), METHODS[method][0], [cell(arm, k) for k in ks]) for (shape, method), arm in summary.items()],
    )


def render_ablation_tables(rows: list[dict]) -> dict[str, str]:
    summary = summarize_ablation(rows)
    if not summary:
        return {}
    return {
        'ablation-decision': '\n'.join(ablation_decisions(summary)),
        'ablation-arms': table_ablation(summary),
        'ablation-sweep': table_ablation_sweep(summary),
    }
