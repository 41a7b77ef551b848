"""The study of ``wesar-experiments --groups study``: each arm at its own best learning rate.

From ``results.csv`` rows of group ``study``: per shape and arm the best learning rate and its
validation loss, the LR sensitivity of Wortsman et al. (2023), the basin width, spikes, the d/u
gap and the largest attention logit; the differences against Small init with their standard
errors; the decision rule of ``docs/reproduction.md`` applied to them; and the picture of loss
against lr / sigma. With rows of group ``refine`` (``--groups refine``): each compared arm near
its optimum, with the seed noise there, and rules 1(a), 2 and 3 applied again to those.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wesar_composer.tools.experiments.grid import FULL, METHODS, REFINE_ARMS, SHAPES, arm_sigma, refine_lrs
from wesar_composer.tools.experiments.measures import EQUIVALENCE_MARGIN, Paired, basin, sensitivity
from wesar_composer.tools.experiments.measures import mean_sd as _stats
from wesar_composer.tools.experiments.tables import best_in_bold, sweep_table

__all__ = [
    'ArmSummary',
    'summarize',
    'best_lrs',
    'summarize_refined',
    'paired_twin',
    'interpolated_basins',
    'render_study_tables',
    'plot_study',
]

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


def best_lrs(rows: list[dict]) -> dict[tuple[str, str], float]:
    """The study's best learning rate of each (shape, arm) that the refinement runs again."""
    return {k: s.best_lr for k, s in summarize(rows).items() if k[1] in REFINE_ARMS and math.isfinite(s.best_lr)}


@dataclass
class Refined:
    """An arm near its optimum: the study's best lr and the refinement's lrs beside it."""

    shape: str
    method: str
    lrs: list[float]
    means: list[float]
    best_lr: float
    best: float
    se: float  # of the best point's mean, from the seed variance pooled over the shape's near-optimum points


def _in_shape_order(shapes) -> list[str]:
    return sorted(shapes, key=lambda s: (SHAPE_ORDER.index(s) if s in SHAPE_ORDER else len(SHAPE_ORDER), s))


def summarize_refined(
    rows: list[dict], summary: Optional[dict[tuple[str, str], ArmSummary]] = None
) -> dict[tuple[str, str], Refined]:
    """Each refined arm's best over its near-optimum points (the study's best lr and the refinement's
    lrs beside it), with the seed variance pooled over those points of the shape: the noise near the
    optimum, not that of the unstable learning rates past it. Refinement runs at other learning
    rates (around an earlier best) are left out; an arm whose every near-optimum run diverged is too.
    ``summary``: ``summarize(rows)``, if already at hand."""
    summary = summary if summary is not None else summarize(rows)
    near: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        key = (r['shape'], r['method'])
        if key not in summary or r['method'] not in REFINE_ARMS or not math.isfinite(summary[key].best_lr):
            continue
        best_lr = summary[key].best_lr
        if (r['group'] == 'refine' and r['lr'] in refine_lrs(r['method'], best_lr)) or (
            r['group'] == 'study' and r['lr'] == best_lr
        ):
            near.setdefault(key, []).append(r)
    refined = {k: v for k, v in near.items() if any(r['group'] == 'refine' for r in v)}
    out = {}
    for shape in _in_shape_order({k[0] for k in refined}):
        pooled = _pooled([r for k, v in refined.items() if k[0] == shape for r in v])
        for method in REFINE_ARMS:
            sel = refined.get((shape, method))
            if not sel:
                continue
            lrs = sorted({r['lr'] for r in sel})
            runs = {lr: [r['val_loss'] for r in sel if r['lr'] == lr and not r['diverged']] for lr in lrs}
            means = [statistics.fmean(_finite(v)) if _finite(v) else float('nan') for v in runs.values()]
            finite = [(m, lr) for m, lr in zip(means, lrs) if math.isfinite(m)]
            if not finite:
                continue
            best, best_lr = min(finite)
            seeds = len(_finite(runs[best_lr]))
            out[(shape, method)] = Refined(shape, method, lrs, means, best_lr, best, math.sqrt(pooled / seeds))
    return out


def table_refined(refined: dict[tuple[str, str], Refined]) -> str:
    lines = [
        '| shape | arm | mean loss at each lr near the optimum | best lr | best (± SE) | Δ vs Small init |',
        '|---|---|---|---|---|---|',
    ]
    for (shape, method), r in refined.items():
        points = ', '.join(f'{lr:g}: {m:.3f}' for lr, m in zip(r.lrs, r.means))
        diff = difference(refined, shape, method, SMALL) if method != SMALL else None
        lines.append(
            f'| {_shape_label(shape)} | {METHODS[method][0]} | {points} | {r.best_lr:g} | {r.best:.3f} ± {r.se:.3f} '
            f'| {diff if diff else ""} |'
        )
    return '\n'.join(lines)


def refined_decisions(refined: dict[tuple[str, str], Refined]) -> list[str]:
    """Rules 1(a), 2 and 3 of the decision rule on the refined bests and near-optimum SEs."""
    depths = [d for d in DEPTHS if (d, SMALL) in refined and (d, 'wesar_width') in refined]
    if len(depths) < 3:
        return [f'Small init and WeSaR refined at {len(depths)} of the 3 depths: the rules cannot be applied.']
    if not all(math.isfinite(refined[(d, SMALL)].se) for d in depths):
        return ['No seed variance near the optimum (one seed): the rules cannot be applied.']
    vs_small, wins = _against_small(refined, depths, 'wesar_width')
    gap = {d: -x.delta for d, x in vs_small.items() if x}
    growing = gap['d64-L8'] > gap['d64-L2']
    lines = [
        '1(a). WeSaR - Small init: '
        + ', '.join(f'{_shape_label(d)} {x}' for d, x in vs_small.items())
        + f'; beats it by more than 2 SE at {len(wins)} of 3 depths, gap {"growing" if growing else "not growing"} '
        f'with N. **{"WeSaR reaches a lower loss." if len(wins) >= 2 and growing else "WeSaR does not reach a lower loss."}**'
    ]
    shapes = _in_shape_order({s for s, m in refined if m == 'wesar_width'})
    lines.append(_gates_line('2. WeSaR - per-matrix lr', refined, shapes, 'no refined per-matrix-lr arm or SE at'))
    od, od_wins = _against_small(refined, depths, 'small_od_lr')
    lines.append(
        '3. W_o / W_d lr / sqrt(2N) - Small init: '
        + ', '.join(f'{_shape_label(d)} {x if x else "not refined"}' for d, x in od.items())
        + f'; more than 2 SE lower at {len(od_wins)} of 3 depths. **{OD_VERDICT if len(od_wins) >= 2 else "Not shown."}**'
    )
    return lines


def _losses(rows: list[dict], shape: str, method: str) -> dict[float, dict[int, float]]:
    """lr -> seed -> validation loss of the study's and the refinement's runs of one arm."""
    out: dict[float, dict[int, float]] = {}
    for r in rows:
        if r['group'] in ('study', 'refine') and r['shape'] == shape and r['method'] == method:
            loss = r['val_loss'] if not r['diverged'] and math.isfinite(r['val_loss']) else INITIAL_LOSS
            out.setdefault(r['lr'], {})[r['seed']] = min(loss, INITIAL_LOSS)
    return out


def _pairs(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


@dataclass
class TwinPairs:
    """WeSaR (width-scaled sigma) against its gate-free twin, run by run: same shape, lr and seed."""

    at_optimum: Paired  # at WeSaR's refined best lr of each shape
    everywhere: Paired  # every lr both ran
    top: Paired  # at the top lr both ran (3e-2)
    vs_small: Paired  # WeSaR minus Small init, each at its refined best lr, paired by seed
    od_vs_small: Paired  # W_o / W_d lr / sqrt(2N) minus Small init, each at its refined best lr


def paired_twin(rows: list[dict], refined: Optional[dict[tuple[str, str], Refined]] = None) -> Optional[TwinPairs]:
    """The study's comparisons paired run by run (the seed fixes the data order and the virtual init,
    shared by WeSaR and its twin): at the refined optimum, at every lr, at the top lr."""
    refined = refined if refined is not None else summarize_refined(rows)
    shapes = _in_shape_order({s for s, m in refined if m == 'wesar_width' and (s, 'matrix_lr') in refined})
    if not shapes:
        return None
    opt, every, top, vs_small, od = [], [], [], [], []
    for shape in shapes:
        w, t = _losses(rows, shape, 'wesar_width'), _losses(rows, shape, 'matrix_lr')
        opt += _pairs(
            w.get(refined[(shape, 'wesar_width')].best_lr, {}), t.get(refined[(shape, 'wesar_width')].best_lr, {})
        )
        common = sorted(set(w) & set(t))
        for lr in common:
            every += _pairs(w[lr], t[lr])
        if common:
            top += _pairs(w[common[-1]], t[common[-1]])
        if (shape, SMALL) in refined:
            s = _losses(rows, shape, SMALL)[refined[(shape, SMALL)].best_lr]
            vs_small += _pairs(w[refined[(shape, 'wesar_width')].best_lr], s)
            if (shape, 'small_od_lr') in refined:
                o = _losses(rows, shape, 'small_od_lr')[refined[(shape, 'small_od_lr')].best_lr]
                od += _pairs(o, s)
    return TwinPairs(Paired(opt), Paired(every), Paired(top), Paired(vs_small), Paired(od))


def table_paired(pairs: TwinPairs) -> str:
    m = EQUIVALENCE_MARGIN
    lines = [
        f'| comparison | paired difference (mean ± SE) | TOST within ±{m:g} nats | verdict |',
        '|---|---|---|---|',
    ]
    for name, p, a, b in (
        ("WeSaR - twin at WeSaR's refined best lr", pairs.at_optimum, 'WeSaR', 'the twin'),
        ('WeSaR - twin at every lr both ran', pairs.everywhere, 'WeSaR', 'the twin'),
        ('WeSaR - twin at the top lr (3e-2)', pairs.top, 'WeSaR', 'the twin'),
        ('WeSaR - Small init, each at its refined best lr', pairs.vs_small, 'WeSaR', 'Small init'),
        ('W_o/W_d lr - Small init, each at its refined best lr', pairs.od_vs_small, 'The W_o/W_d-lr arm', 'Small init'),
    ):
        extra = f'; range {min(p.diffs):+.3f} to {max(p.diffs):+.3f}' if p.n else ''
        lines.append(f'| {name} | {p}{extra} | {"yes" if p.equivalent(m) else "no"} | {p.verdict(m, a, b)} |')
    return '\n'.join(lines)


BASIN_ARMS = ('small_rapid', 'small_qkln', 'small_od_lr', 'wesar_width', 'matrix_lr')


def interpolated_basins(rows: list[dict]) -> dict[tuple[str, str], tuple[float, bool, float]]:
    """Per (shape, arm): the basin (decades within 0.1 nats of the best, interpolated on log lr, the
    refinement's points included), whether it reaches the end of the range, and the LR sensitivity,
    both over the lr / sigma range that every arm of the shape covers."""
    out = {}
    for shape in _in_shape_order({r['shape'] for r in rows if r['group'] == 'study'}):
        d = SHAPES[shape]['d_model'] if shape in SHAPES else 64
        curves = {}
        for method in BASIN_ARMS:
            losses = _losses(rows, shape, method)
            if len(losses) > 1:
                lrs = sorted(losses)
                xs = [math.log10(lr / _sigma(method, d)) for lr in lrs]
                curves[method] = (xs, [statistics.fmean(losses[lr].values()) for lr in lrs])
        if not curves:
            continue
        span = (max(c[0][0] for c in curves.values()), min(c[0][-1] for c in curves.values()))
        for method, (xs, ys) in curves.items():
            width, edge = basin(xs, ys, BASIN_NATS, span)
            out[(shape, method)] = (width, edge, sensitivity(xs, ys, INITIAL_LOSS, span))
    return out


def table_basins(basins: dict[tuple[str, str], tuple[float, bool, float]]) -> str:
    lines = [
        '| shape | arm | basin (decades, interpolated) | Δ basin vs Small init | LR sensitivity (common range) |',
        '|---|---|---|---|---|',
    ]
    for (shape, method), (width, edge, sens) in basins.items():
        small = basins.get((shape, SMALL))
        delta = f'{width - small[0]:+.2f}' if small and method != SMALL else ''
        lines.append(
            f'| {_shape_label(shape)} | {METHODS[method][0]} | {width:.2f}{"+" if edge else ""} | {delta} | {sens:.3f} |'
        )
    return '\n'.join(lines)


def render_study_tables(rows: list[dict]) -> dict[str, str]:
    summary = summarize(rows)
    if not summary:
        return {}
    tables = {
        'study-arms': table_arms(summary),
        'study-sweep': table_sweep(summary),
        'study-vs-small': table_vs_small(summary),
        'study-decision': '\n'.join(decisions(summary)),
    }
    refined = summarize_refined(rows, summary)
    if refined:
        tables['study-refined'] = table_refined(refined)
        tables['study-refined-decision'] = '\n'.join(refined_decisions(refined))
        pairs = paired_twin(rows, refined)
        if pairs is not None:
            tables['study-paired'] = table_paired(pairs)
    basins = interpolated_basins(rows)
    if basins:
        tables['study-basins'] = table_basins(basins)
    return tables


def plot_study(out_dir: Path, rows: list[dict]) -> list[str]:
    """Validation loss against lr and against lr / sigma, one column per shape."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    shapes = [s for s in ('d64-L2', 'base', 'd64-L8', 'd128-L4') if any(k[0] == s for k in summary)]
    if not shapes:
        return []
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False, sharey=True)
    for col, shape in enumerate(shapes):
        d = SHAPES[shape]['d_model']
        for method in ARM_ORDER:
            s = summary.get((shape, method))
            if s is None:
                continue
            style = '--' if method in ('matrix_lr', 'small_od_lr') else '-'
            for row, x in enumerate((s.lrs, [lr / _sigma(method, d) for lr in s.lrs])):
                axes[row][col].plot(x, s.means, style, marker='o', label=METHODS[method][0])
        axes[0][col].set_title(_shape_label(shape))
        axes[0][col].set_xlabel('peak learning rate')
        axes[1][col].set_xlabel('lr / sigma (sigma: std of the actual weights)')
        for row in (0, 1):
            axes[row][col].set_xscale('log')
            axes[row][col].grid(alpha=0.3)
    for row in (0, 1):
        axes[row][0].set_ylabel('validation loss')
    axes[0][0].set_ylim(top=INITIAL_LOSS)
    legend = {}
    for ax in axes[0]:  # every arm once, the literal sigma's too (first shape only)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc='lower center', ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out_dir / 'figures' / 'study_lr.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
