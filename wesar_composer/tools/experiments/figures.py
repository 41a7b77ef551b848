"""The figures of ``wesar-experiments``: loss curves, the lr sweep, and ``wesar-plot``'s pictures per shape."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from wesar_composer.tools.experiments.grid import LR_METHODS, MAIN_METHODS, METHODS, _say
from wesar_composer.tools.experiments.tables import NORMS_JSON, _select, _stats

__all__ = ['plot_figures']


def _curves(out_dir: Path, names: Sequence[str]) -> list[list[float]]:
    curves = []
    for name in names:
        path = out_dir / 'curves' / f'{name}.json'
        if path.is_file():
            curves.append([float('nan') if x is None else x for x in json.loads(path.read_text())['loss']])
    return curves


def _write_norms(runs, monitored: list[dict], path: Path) -> str:
    """||W_d||, ||W_u|| of the last layer at the first and last logged step, per monitored run."""
    records = []
    for run, row in zip(runs, monitored):
        layer = row['n_layers'] - 1
        record = {'label': row['label'], 'shape': row['shape'], 'layer': layer}
        for role in ('d', 'u'):
            steps, values = run.history(f'param_norm/L{layer}/{role}')
            record[role] = {'first_step': steps[0], 'first': values[0], 'last_step': steps[-1], 'last': values[-1]}
        records.append(record)
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def plot_figures(out_dir: Path, rows: list[dict]) -> list[str]:
    """Loss curves per shape, the lr sweep, and ``wesar-plot``'s update-ratio pictures per shape."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    from wesar_composer.tools import plotting

    fig_dir = out_dir / 'figures'
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shape in sorted({r['shape'] for r in rows if r['group'] == 'main'}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, method in enumerate(MAIN_METHODS):
            sel = _select(rows, group='main', shape=shape, method=method)
            curves = _curves(out_dir, [r['run_name'] for r in sel])
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            tokens = (
                np.arange(1, n + 1) * sel[0]['batch'] * (sel[0]['tokens'] // max(sel[0]['batch'] * sel[0]['steps'], 1))
            )
            mean = np.nanmean(arr, axis=0)
            ax.plot(tokens, mean, label=f'{METHODS[method][0]} ({len(curves)} seeds)', color=f'C{i}', lw=1.2)
            if len(curves) > 1:
                ax.fill_between(tokens, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=f'C{i}', alpha=0.15)
        first = _select(rows, group='main', shape=shape)[0]
        d, n_layers = first['d_model'], first['n_layers']
        ax.set(
            xlabel='training tokens',
            ylabel='training loss',
            title=f'{shape}: d {d}, {n_layers} layers (mean; band: min-max over seeds)',
        )
        ax.legend(fontsize=7, loc='lower left')
        path = fig_dir / f'loss_{shape}.png'
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

        monitored = [r for r in _select(rows, group='main', shape=shape) if r['run_id']]
        if monitored and not (out_dir / 'mlruns').is_dir():
            _say(f'{out_dir / "mlruns"} not found: update-ratio pictures of {shape} left as they are')
        elif monitored:
            tracking_uri = str((out_dir / 'mlruns').resolve())
            runs = plotting.load_runs(tracking_uri, [r['run_id'] for r in monitored])
            for run, r in zip(runs, monitored):
                run.name = r['label']
            shape_dir = fig_dir / shape
            shape_dir.mkdir(exist_ok=True)
            written += plotting.plot_runs(runs, str(shape_dir))
            written.append(_write_norms(runs, monitored, shape_dir / NORMS_JSON))

    sweep = [r for r in rows if r['group'] == 'lr']
    if sweep:
        shapes = sorted({r['shape'] for r in sweep})
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            seeds = {r['seed'] for r in sweep if r['shape'] == shape}
            for i, method in enumerate(LR_METHODS):
                runs = [r for r in _select(rows, group='main', shape=shape, method=method) if r['seed'] in seeds]
                runs = sorted(runs + _select(sweep, shape=shape, method=method), key=lambda r: r['lr'])
                grid = sorted({r['lr'] for r in runs})
                means = [_stats([r['val_loss'] for r in runs if r['lr'] == lr])[0] for lr in grid]
                ax.plot(grid, means, '-', color=f'C{i}', label=f'{METHODS[method][0]} (mean; dots: seeds)')
                ax.plot([r['lr'] for r in runs], [r['val_loss'] for r in runs], 'o', color=f'C{i}', ms=4, alpha=0.6)
                for lr, mean in zip(grid, means):
                    at = [r for r in runs if r['lr'] == lr]
                    spikes, div = sum(r['spikes'] for r in at), sum(r['diverged'] for r in at)
                    if spikes or div:
                        ax.annotate(
                            f'{spikes} spike(s)' + (f', {div} diverged' if div else '') + f' in {len(at)} runs',
                            (lr, mean if math.isfinite(mean) else ax.get_ylim()[1]),
                            fontsize=7,
                            color=f'C{i}',
                            xytext=(-110, -4),
                            textcoords='offset points',
                        )
            ax.set(xscale='log', xlabel='peak learning rate', ylabel='validation loss', title=f'lr sweep, {shape}')
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / 'lr_sweep.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    if any(r['group'] == 'study' for r in rows):
        from wesar_composer.tools.experiments.study import plot_study

        written += plot_study(out_dir, rows)
    return written
