"""The results of ``wesar-experiments``: ``results.csv`` and the generated tables of the results page."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from wesar_composer.tools.experiments.grid import LR_METHODS, MAIN_METHODS, METHODS, REPARAM_METHODS
from wesar_composer.tools.experiments.measures import mean_sd as _stats

__all__ = ['RESULTS_CSV', 'Row', 'CSV_FIELDS', 'read_results', 'render_group_tables', 'table_norms']

RESULTS_CSV = 'results.csv'
NORMS_JSON = 'last_layer_norms.json'  # per shape, written by figures.plot_figures, read by table_norms


@dataclass
class Row:
    """One line of ``results.csv``."""

    group: str
    method: str
    label: str
    shape: str
    d_model: int
    n_layers: int
    seed: int
    setting: str
    lr: float
    batch: int
    steps: int
    warmup: int
    tokens: int
    n_params: int
    val_loss: float
    val_ppl: float
    final_train_loss: float
    spikes: int
    diverged: int
    d_over_u_last: float
    wall_s: float
    batch_s: float  # median seconds per training batch (less sensitive to a shared machine's load)
    run_name: str
    run_id: str
    max_attn_logit: float = float('nan')  # largest attention logit of the trained model (last batch)


CSV_FIELDS = [f.name for f in fields(Row)]


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline='') as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for name in (
                'd_model',
                'n_layers',
                'seed',
                'batch',
                'steps',
                'warmup',
                'tokens',
                'n_params',
                'spikes',
                'diverged',
            ):
                row[name] = int(row[name])
            for name in (
                'lr',
                'val_loss',
                'val_ppl',
                'final_train_loss',
                'd_over_u_last',
                'wall_s',
                'batch_s',
                'max_attn_logit',
            ):
                row[name] = float(row[name]) if row.get(name) not in ('', None) else float('nan')
            rows.append(row)
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _ms(values: Sequence[float], spec: str = '.3f') -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return '-'
    return f'{mean:{spec}} ± {std:{spec}}' if n > 1 else f'{mean:{spec}}'


def _loss_cells(sel: list[dict]) -> str:
    """The validation loss and perplexity of the runs ``sel``, mean ± std: two cells."""
    return f'{_ms([r["val_loss"] for r in sel])} | {_ms([r["val_ppl"] for r in sel], ".1f")}'


def _run_cells(sel: list[dict]) -> str:
    """The spikes, the number and the wall time of the runs ``sel``: three cells."""
    return f'{sum(r["spikes"] for r in sel)} | {len(sel)} | {_ms([r["wall_s"] for r in sel], ".0f")} s'


def best_in_bold(text: str, best: bool) -> str:
    return f'**{text}**' if best else text


def sweep_table(columns: Sequence[str], rows: Iterable[tuple[str, str, Sequence[str]]]) -> str:
    """A markdown table with a row per ``(shape, arm, cells)`` and a column per point of a sweep."""
    lines = ['| shape | arm | ' + ' | '.join(columns) + ' |', '|---|---|' + '---|' * len(columns)]
    lines += [f'| {shape} | {arm} | ' + ' | '.join(cells) + ' |' for shape, arm, cells in rows]
    return '\n'.join(lines)


# The paper's figures (1.3B, WikiText / LAMBADA perplexity): Tables 5 and 7 (30B tokens), Table 6
# (10B tokens, mean (std) of five runs, time in hours with the overhead vs Small init).
PAPER_T57 = {
    'small_rapid': '16.55 / 26.29',
    'small_stable': '21.44 / 28.81',
    'he': '16.70 / 26.50',
    'wesar': '14.51 / 22.87',
    'wesar_small': '15.91 / 24.37',
    'wesar_fixed': '15.21 / 25.61',
}
PAPER_T6 = {
    'small_rapid': ('20.64 (0.52) / 29.50 (0.53)', '18.88 h'),
    'weight_norm': ('18.87 (0.59) / 27.69 (0.86)', '+12.6%'),
    'sigma_reparam': ('25.26 (1.65) / 30.74 (0.74)', '+6.25%'),
    'residual_scaling_he': ('23.15 (0.37) / 31.03 (0.20)', '+1.66%'),
    'residual_scaling_small': ('23.56 (1.03) / 30.78 (0.35)', '+1.58%'),
    'wesar': ('17.74 (0.05) / 27.52 (0.28)', '+1.95%'),
}


def _select(rows, **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def table_main(rows: list[dict], shape: str) -> str:
    lines = [
        '| method | val loss | val perplexity | Δ loss vs Small (rapid) | spikes | seeds | wall time / run | paper 1.3B (WikiText / LAMBADA ppl) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    base = _stats([r['val_loss'] for r in _select(rows, group='main', shape=shape, method='small_rapid')])[0]
    for method in MAIN_METHODS:
        sel = _select(rows, group='main', shape=shape, method=method)
        if not sel:
            continue
        mean = _stats([r['val_loss'] for r in sel])[0]
        delta = f'{mean - base:+.3f}' if method != 'small_rapid' and math.isfinite(base) else '-'
        lines.append(
            f'| {METHODS[method][0]} | {_loss_cells(sel)} | {delta} | {_run_cells(sel)} | {PAPER_T57[method]} |'
        )
    return '\n'.join(lines)


def table_reparam(rows: list[dict]) -> str:
    lines = [
        '| method | val loss | val perplexity | spikes | runs | wall time / run | s / batch (median) | batch time vs Small | paper 1.3B, 10B tokens (ppl WikiText / LAMBADA) | paper time |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    shapes = sorted({r['shape'] for r in rows if r['group'] == 'reparam'})
    for shape in shapes:
        seeds = sorted({r['seed'] for r in rows if r['group'] == 'reparam' and r['shape'] == shape})

        def pick(method, shape=shape, seeds=seeds):
            if method in ('small_rapid', 'wesar'):
                return [r for r in _select(rows, group='main', shape=shape, method=method) if r['seed'] in seeds]
            return _select(rows, group='reparam', shape=shape, method=method)

        base_batch = _stats([r['batch_s'] for r in pick('small_rapid')])[0]
        for method in ('small_rapid',) + REPARAM_METHODS + ('wesar',):
            sel = pick(method)
            if not sel:
                continue
            batch = _stats([r['batch_s'] for r in sel])[0]
            rel = (
                f'{100 * (batch / base_batch - 1):+.0f}%'
                if method != 'small_rapid' and math.isfinite(base_batch)
                else '-'
            )
            paper_ppl, paper_time = PAPER_T6[method]
            lines.append(
                f'| {METHODS[method][0]} ({shape}) | {_loss_cells(sel)} | {_run_cells(sel)} | '
                f'{_ms([r["batch_s"] for r in sel], ".3f")} | {rel} | {paper_ppl} | {paper_time} |'
            )
    return '\n'.join(lines)


def table_lr(rows: list[dict]) -> str:
    lines = [
        '| shape | method | lr | val loss | runs with a spike | spikes | diverged | seeds |',
        '|---|---|---|---|---|---|---|---|',
    ]
    sel = [r for r in rows if r['group'] == 'lr']
    summary = []
    for shape in sorted({r['shape'] for r in sel}):
        seeds = {r['seed'] for r in sel if r['shape'] == shape}
        for method in LR_METHODS:
            runs = [r for r in _select(rows, group='main', shape=shape, method=method) if r['seed'] in seeds]
            runs += _select(sel, shape=shape, method=method)
            clean = []
            for lr in sorted({r['lr'] for r in runs}):
                at = [r for r in runs if r['lr'] == lr]
                spiked = sum(1 for r in at if r['spikes'])
                div = sum(r['diverged'] for r in at)
                lines.append(
                    f'| {shape} | {METHODS[method][0]} | {lr:g} | {_ms([r["val_loss"] for r in at])} | '
                    f'{spiked} / {len(at)} | {sum(r["spikes"] for r in at)} | {div} / {len(at)} | {len(at)} |'
                )
                if not spiked and not div:
                    clean.append(lr)
            summary.append(
                f'- {shape}, {METHODS[method][0]}: largest lr with no spike or divergence in any seed: {max(clean):g}'
                if clean
                else f'- {shape}, {METHODS[method][0]}: every lr tried spiked or diverged'
            )
    return '\n'.join(lines + [''] + summary)


def table_d_over_u(rows: list[dict]) -> str:
    lines = ['| shape | method | median ratio(W_d) / ratio(W_u), last layer | sqrt(2N) |', '|---|---|---|---|']
    for r in rows:
        if r['group'] == 'main' and math.isfinite(r['d_over_u_last']):
            lines.append(
                f'| {r["shape"]} (d {r["d_model"]}, N {r["n_layers"]}) | {r["label"]} | '
                f'{r["d_over_u_last"]:.2f} | {math.sqrt(2 * r["n_layers"]):.2f} |'
            )
    return '\n'.join(lines)


def table_wall(rows: list[dict]) -> str:
    total = sum(r['wall_s'] for r in rows)
    lines = ['| group | shape | runs | wall time per run (mean ± std) | total |', '|---|---|---|---|---|']
    for group in ('main', 'reparam', 'lr', 'study', 'refine', 'ablation'):
        for shape in sorted({r['shape'] for r in rows if r['group'] == group}):
            sel = _select(rows, group=group, shape=shape)
            lines.append(
                f'| {group} | {shape} | {len(sel)} | {_ms([r["wall_s"] for r in sel], ".0f")} s | '
                f'{sum(r["wall_s"] for r in sel) / 60:.1f} min |'
            )
    lines.append(f'| all | | {len(rows)} | | {total / 60:.1f} min |')
    return '\n'.join(lines)


def render_group_tables(rows: list[dict]) -> dict[str, str]:
    """The generated blocks of the earlier groups (main, reparam, lr) and the wall-time tables, by name:
    those of the groups ``rows`` hold. The study's and the ablation's are added by :mod:`~.page`."""
    groups = {r['group'] for r in rows}
    shapes = sorted({r['shape'] for r in rows if r['group'] == 'main'})
    tables = {f'main-{shape}': table_main(rows, shape) for shape in shapes}
    if 'main' in groups:
        tables['d_over_u'] = table_d_over_u(rows)
    if 'reparam' in groups:
        tables['reparam'] = table_reparam(rows)
    if 'lr' in groups:
        tables['lr'] = table_lr(rows)
    if groups & {'main', 'reparam', 'lr'}:
        tables['wall'] = table_wall([r for r in rows if r['group'] not in ('study', 'refine', 'ablation')])
    if 'study' in groups:
        tables['study-wall'] = table_wall([r for r in rows if r['group'] in ('study', 'refine')])
    if 'ablation' in groups:
        tables['ablation-wall'] = table_wall([r for r in rows if r['group'] == 'ablation'])
    return tables


def table_norms(out_dir: Path) -> str:
    """From the ``last_layer_norms.json`` files that :func:`plot_figures` writes."""
    lines = [
        '| shape | method | ‖W_d‖ first → last | change | ‖W_u‖ first → last | change |',
        '|---|---|---|---|---|---|',
    ]
    for path in sorted((out_dir / 'figures').glob(f'*/{NORMS_JSON}')):
        for r in json.loads(path.read_text()):
            cells = []
            for role in ('d', 'u'):
                v = r[role]
                cells.append(
                    f'{v["first"]:.3f} → {v["last"]:.3f} (steps {v["first_step"]}-{v["last_step"]}) | '
                    f'{100 * (v["last"] / v["first"] - 1):+.0f}%'
                )
            lines.append(f'| {r["shape"]} (layer {r["layer"]}) | {r["label"]} | {" | ".join(cells)} |')
    return '\n'.join(lines)
