"""The study's first pass: per shape and arm the best learning rate and what surrounds it, the
differences against Small init, and the decision rule of ``docs/reproduction.md`` applied to them."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from wesar_composer.tools.experiments.grid import FULL, METHODS, SHAPES, arm_sigma
from wesar_composer.tools.experiments.measures import mean_sd as _stats
from wesar_composer.tools.experiments.tables import best_in_bold, sweep_table

SMALL = 'small_rapid'
ARM_ORDER = ('small_rapid', 'small_qkln', 'small_od_lr', 'wesar_width', 'matrix_lr', 'wesar')
DEPTHS = ('d64-L2', 'base', 'd64-L8')  # d 64, N = 2, 4, 8
SHAPE_ORDER = (*DEPTHS, 'd128-L4')  # of the refinement's tables and lines
BASIN_NATS = 0.1  # a learning rate is in the basin if its mean loss is within this of the arm's best
LITERAL_SIGMA_SQUARED = 4e-5
OD_VERDICT = "The depth effect is the residual writers' learning rate."


@dataclass
class ArmSummary:
    shape: str
    method: str
    lrs: list[float]
    means: list[float]  # mean validation loss per lr (NaN if every seed diverged)
    seeds: int
    best_lr: float
    best: float
    se: float  # of the best point's mean, from the shape's pooled seed variance
    se_borrowed: bool  # the shape had no second seed: the variance pooled over every shape was used
    sensitivity: float
    basin: int  # swept half-decades within BASIN_NATS of the best
    basin_at_edge: bool  # the basin reaches the end of the sweep: it may be wider
    spikes: int
    spiked_runs: int
    runs: int
    d_over_u: float  # last layer, first seed, at the best lr
    max_logit_best: float
    max_logit_top: float  # at the largest lr swept


def _finite(values):
    return [v for v in values if math.isfinite(v)]


INITIAL_LOSS = math.log(FULL.vocab_size)  # L0 of the LR sensitivity: a uniform prediction over the study's vocabulary


def _pooled(rows: list[dict]) -> float:
    """Mean of the per-point (shape, arm, lr) seed variances of ``rows``, over points with two or more
    finite seeds and no spike."""
    cells: dict[tuple, list[float]] = {}
    spiked: set[tuple] = set()
    for r in rows:
        key = (r['shape'], r['method'], r['lr'])
        cells.setdefault(key, []).append(r['val_loss'])
        if r['spikes'] or r['diverged']:
            spiked.add(key)
    variances = [statistics.variance(_finite(v)) for k, v in cells.items() if k not in spiked and len(_finite(v)) > 1]
    return statistics.fmean(variances) if variances else float('nan')


def pooled_variance(rows: list[dict], shape: Optional[str]) -> float:
    """The seed variance of the study's points at ``shape`` (every shape: None), pooled by ``_pooled``."""
    return _pooled([r for r in rows if r['group'] == 'study' and (shape is None or r['shape'] == shape)])


def summarize(rows: list[dict]) -> dict[tuple[str, str], ArmSummary]:
    study = [r for r in rows if r['group'] == 'study']
    l0 = INITIAL_LOSS
    out = {}
    everywhere = pooled_variance(study, None)
    for shape in sorted({r['shape'] for r in study}):
        pooled = pooled_variance(study, shape)
        borrowed = not math.isfinite(pooled)  # no point of this shape has two seeds (a deadline cut them)
        if borrowed:
            pooled = everywhere
        for method in ARM_ORDER:
            sel = [r for r in study if r['shape'] == shape and r['method'] == method]
            if not sel:
                continue
            lrs = sorted({r['lr'] for r in sel})
            by_lr = {lr: [r for r in sel if r['lr'] == lr] for lr in lrs}
            means = []
            for lr in lrs:
                vals = [r['val_loss'] if not r['diverged'] else float('nan') for r in by_lr[lr]]
                means.append(statistics.fmean(_finite(vals)) if _finite(vals) else float('nan'))
            finite = [(m, lr) for m, lr in zip(means, lrs) if math.isfinite(m)]
            best, best_lr = min(finite) if finite else (float('nan'), float('nan'))
            seeds = len(by_lr[best_lr]) if finite else 0
            capped = [min(m, l0) if math.isfinite(m) else l0 for m in means]
            in_basin = [math.isfinite(m) and m <= best + BASIN_NATS for m in means]
            first_seed = min(r['seed'] for r in sel)
            at_best = by_lr.get(best_lr, [])
            d_u = [r['d_over_u_last'] for r in at_best if r['seed'] == first_seed]
            out[(shape, method)] = ArmSummary(
                shape=shape,
                method=method,
                lrs=lrs,
                means=means,
                seeds=seeds,
                best_lr=best_lr,
                best=best,
                se=math.sqrt(pooled / seeds) if seeds else float('nan'),
                se_borrowed=borrowed,
                sensitivity=statistics.fmean(c - best for c in capped) if finite else float('nan'),
                basin=sum(in_basin),
                basin_at_edge=in_basin[0] or in_basin[-1],
                spikes=sum(int(r['spikes']) for r in sel),
                spiked_runs=sum(1 for r in sel if r['spikes']),
                runs=len(sel),
                d_over_u=d_u[0] if d_u else float('nan'),
                max_logit_best=_mean([r.get('max_attn_logit', float('nan')) for r in at_best]),
                max_logit_top=_mean([r.get('max_attn_logit', float('nan')) for r in by_lr[lrs[-1]]]),
            )
    return out


def _mean(values) -> float:
    return _stats([float('nan') if v is None else float(v) for v in values])[0]


def _shape_label(shape: str) -> str:
    dims = SHAPES[shape]
    return f'd {dims["d_model"]}, N {dims["n_layers"]}'


_sigma = arm_sigma  # the std of the arm's actual weights that its relative step lr / sigma is measured against


def table_arms(summary: dict[tuple[str, str], ArmSummary]) -> str:
    lines = [
        '| shape | arm | best lr | val loss at best lr (± SE) | LR sensitivity | basin (half-decades) '
        '| runs with a spike | d/u gap | max attention logit (best lr / top lr) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for (shape, method), s in summary.items():
        basin = f'{"≥" if s.basin_at_edge else ""}{s.basin}'
        lines.append(
            f'| {_shape_label(shape)} | {METHODS[method][0]} | {s.best_lr:g} | {s.best:.3f} ± {s.se:.3f}{"*" if s.se_borrowed else ""} '
            f'| {s.sensitivity:.3f} | {basin} | {s.spiked_runs} / {s.runs} | {s.d_over_u:.2f} '
            f'| {s.max_logit_best:.1f} / {s.max_logit_top:.1f} |'
        )
    if any(s.se_borrowed for s in summary.values()):
        lines += [
            '',
            '*: this shape has no point with two seeds; its SE uses the seed variance pooled over every shape.',
        ]
    return '\n'.join(lines)


def table_sweep(summary: dict[tuple[str, str], ArmSummary]) -> str:
    """Mean validation loss at every lr, one row per shape and arm."""
    all_lrs = sorted({lr for s in summary.values() for lr in s.lrs})

    def cell(s: ArmSummary, lr: float) -> str:
        if lr not in s.lrs:
            return ''
        m = s.means[s.lrs.index(lr)]
        return best_in_bold(f'{m:.3f}' if math.isfinite(m) else 'diverged', lr == s.best_lr)

    return sweep_table(
        [f'{lr:g}' for lr in all_lrs],
        [
            (_shape_label(shape), METHODS[method][0], [cell(s, lr) for lr in all_lrs])
            for (shape, method), s in summary.items()
        ],
    )


@dataclass
class Difference:
    delta: float  # arm - reference, best-lr loss
    se: float

    @property
    def z(self) -> float:
        return self.delta / self.se if self.se > 0 else float('nan')

    def __str__(self) -> str:
        return f'{self.delta:+.3f} ± {self.se:.3f} ({self.z:+.1f} SE)'


def difference(summary, shape: str, method: str, reference: str) -> Optional[Difference]:
    a, b = summary.get((shape, method)), summary.get((shape, reference))
    if a is None or b is None:
        return None
    return Difference(a.best - b.best, math.sqrt(a.se**2 + b.se**2))


def table_vs_small(summary) -> str:
    lines = [
        '| shape | arm | Δ best-lr loss vs Small init | Δ basin | Δ LR sensitivity |',
        '|---|---|---|---|---|',
    ]
    for (shape, method), s in summary.items():
        if method == SMALL or (shape, SMALL) not in summary:
            continue
        small = summary[(shape, SMALL)]
        lines.append(
            f'| {_shape_label(shape)} | {METHODS[method][0]} | {difference(summary, shape, method, SMALL)} '
            f'| {s.basin - small.basin:+d} | {s.sensitivity - small.sensitivity:+.3f} |'
        )
    return '\n'.join(lines)


def _against_small(summary, depths, method: str) -> tuple[dict[str, Optional[Difference]], list[str]]:
    """``method`` - Small init at each depth, and the depths where it is more than 2 SE lower."""
    diffs = {d: difference(summary, d, method, SMALL) for d in depths}
    return diffs, [d for d, x in diffs.items() if x and x.z < -2]


def _gates_line(title: str, summary, shapes, missing_what: str) -> str:
    """Rule 2: WeSaR - per-matrix lr at each of ``shapes`` within 2 SE everywhere, or not, or undecidable."""
    diffs = {s: difference(summary, s, 'wesar_width', 'matrix_lr') for s in shapes}
    missing = [s for s, d in diffs.items() if d is None or not math.isfinite(d.z)]
    if missing or not diffs:
        verdict = f'Cannot be decided: {missing_what} {", ".join(_shape_label(s) for s in missing) or "any shape"}.'
    elif all(d is not None and abs(d.z) <= 2 for d in diffs.values()):
        verdict = 'The gates add nothing beyond the learning rates.'
    else:
        verdict = 'The gates differ from the learning rates.'
    return (
        f'{title}: '
        + ', '.join(f'{_shape_label(s)} {d if d else "not refined"}' for s, d in diffs.items())
        + (f'. **{verdict}**')
    )


def _helps(by_loss: bool, by_basin: bool) -> str:
    """Rule 1's verdict, naming which part of it holds."""
    if by_loss:
        return 'WeSaR helps: a lower loss (1(a)).'
    if by_basin:
        return 'WeSaR helps by 1(b) only: a basin a half-decade wider on the grid, not a lower loss.'
    return 'No evidence that WeSaR helps at this scale.'


def decisions(summary) -> list[str]:
    """The decision rule of docs/reproduction.md, applied; one line per rule."""
    depths = [d for d in DEPTHS if (d, SMALL) in summary and (d, 'wesar_width') in summary]
    lines = []
    if len(depths) < 3:
        lines.append(f'Only {len(depths)} of the 3 depths have both Small init and WeSaR: the rule cannot be applied.')
        return lines
    no_se = [d for d in depths if not math.isfinite(summary[(d, SMALL)].se)]
    if no_se:
        lines.append(
            f'No seed variance at {", ".join(_shape_label(d) for d in no_se)} yet: the rule cannot be applied.'
        )
        return lines
    vs_small, wins = _against_small(summary, depths, 'wesar_width')
    gap = {d: -x.delta for d, x in vs_small.items() if x}
    growing = gap['d64-L8'] > gap['d64-L2']
    wider = [d for d in depths if summary[(d, 'wesar_width')].basin >= summary[(d, SMALL)].basin + 1]
    lines.append(
        f'1. WeSaR beats Small init by more than 2 SE at {len(wins)} of 3 depths ({", ".join(wins) or "none"}); '
        f'gap Small - WeSaR {gap["d64-L2"]:+.3f} (N 2), {gap["base"]:+.3f} (N 4), {gap["d64-L8"]:+.3f} (N 8), '
        f'{"growing" if growing else "not growing"} with N; basin wider by a half-decade or more at {len(wider)} of 3. '
        f'**{_helps(len(wins) >= 2 and growing, len(wider) >= 2)}**'
    )
    shapes = sorted({s for s, m in summary if m == 'wesar_width' and (s, 'matrix_lr') in summary})
    lines.append(_gates_line('2. WeSaR - per-matrix lr at each shape', summary, shapes, 'no SE at'))
    _, od = _against_small(summary, depths, 'small_od_lr')
    lines.append(
        f'3. Small init with W_o / W_d at lr / sqrt(2N) beats Small init by more than 2 SE at {len(od)} of 3 depths '
        f'({", ".join(od) or "none"}). '
        f'**{OD_VERDICT if len(od) >= 2 else "Not shown."}**'
    )
    control_shapes = sorted({s for s, m in summary if m == 'small_qkln' and (s, SMALL) in summary})
    lower = [s for s in control_shapes if summary[(s, 'small_qkln')].sensitivity < summary[(s, SMALL)].sensitivity]
    wider_c = [s for s in control_shapes if summary[(s, 'small_qkln')].basin >= summary[(s, SMALL)].basin + 1]
    ok = len(lower) >= 2 or len(wider_c) >= 2
    lines.append(
        f'4. qk-LayerNorm against Small init: lower LR sensitivity at {len(lower)} of {len(control_shapes)} shapes, '
        f'basin wider by a half-decade or more at {len(wider_c)}. '
        f'**{"The control passes: the proxy sees a known stability benefit." if ok else "The control fails: this proxy cannot judge stability claims."}**'
    )
    literal = summary.get(('base', 'wesar'))
    width = summary.get(('base', 'wesar_width'))
    if literal and width:
        lines.append(
            f'5. Base shape: literal sigma^2 = 4e-5 best {literal.best:.3f} ± {literal.se:.3f} at lr {literal.best_lr:g}, '
            f'basin {literal.basin}; width-scaled best {width.best:.3f} ± {width.se:.3f} at lr {width.best_lr:g}, '
            f'basin {width.basin}.'
        )
    return lines
