"""The study's refinement (rows of group ``refine``): each compared arm near its optimum with the seed
noise there, rules 1(a), 2 and 3 applied again, the comparisons paired run by run, and the basins
interpolated on log lr."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from wesar_composer.tools.experiments.grid import METHODS, REFINE_ARMS, SHAPES, refine_lrs
from wesar_composer.tools.experiments.measures import EQUIVALENCE_MARGIN, Paired, basin, sensitivity
from wesar_composer.tools.experiments.study.arms import (
    BASIN_NATS,
    DEPTHS,
    INITIAL_LOSS,
    OD_VERDICT,
    SHAPE_ORDER,
    SMALL,
    ArmSummary,
    _against_small,
    _finite,
    _gates_line,
    _pooled,
    _shape_label,
    _sigma,
    difference,
    summarize,
)


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
