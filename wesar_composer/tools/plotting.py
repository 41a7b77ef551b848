"""Draw the paper's pictures from runs in an MLflow store: ``wesar-plot``.

Reads the keys that :class:`~wesar_composer.callbacks.UpdateRatioMonitor` logs and writes PNGs:

- ``update_ratio_L{layer}.png``: training loss over steps on top; the update ratios of W_d and
  W_u of one layer below (Figure 1 of Nishida et al. 2024). The x axis counts batches from 1:
  the update ratio logged at step n is that of batch n, whose loss Composer logs at step n - 1.
- ``param_norm_L{layer}.png``: ||W_d|| and ||W_u|| of that layer over steps (Figure 3).
- ``update_ratio_heatmap.png``: layers x roles, the mean update ratio over the logged steps,
  one panel per run on a shared log color scale; e and p in the panel titles.
- ``spike_post_mortem.png`` (runs with loss spikes only): for each spike, the matrices whose
  update ratio rose most before it, from the tables ``LossSpikeCounter`` logs; the spikes are
  also marked on the update-ratio picture.

Several runs overlay with a legend outside the axes (for example the Small-init baseline and
WeSaR); with no runs named, the newest run of each name in the store.

    wesar-plot                                     # the demo YAML's store, ./runs/mlruns
    wesar-plot --tracking-uri ./mlruns --runs baseline wesar --out plots/

Without ``--tracking-uri``: ``$MLFLOW_TRACKING_URI``, else the first of :data:`DEFAULT_STORES`
that exists (``./runs/mlruns``, where the demo YAML logs, then MLflow's own ``./mlruns``).

One module: every picture is drawn from the same ``Run`` records with the same figure helpers, for
the one ``wesar-plot`` command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, cast

from wesar_composer.callbacks.keys import LAYER_KEY, LOSS_KEY

LAYERED_ROLES = ('q', 'k', 'v', 'o', 'g', 'u', 'd')
ROLE_STYLES = {'d': '-', 'u': '--'}
_REDUCE = {'mean': statistics.fmean, 'median': statistics.median, 'max': max}
SPIKE_TABLE_DIR = 'loss_spike'  # LossSpikeCounter's tables: loss_spike/update_ratio_rise_{n}.json
_SPIKE_TABLE = re.compile(r'^update_ratio_rise_(\d+)\.json$')
SPIKE_MATRICES = 10  # bars per spike panel
SPIKE_PANELS = 6  # spike panels per picture: the first spikes of each run
LEGEND = {'loc': 'upper left', 'bbox_to_anchor': (1.01, 1.0), 'borderaxespad': 0.0}  # outside the axes


@dataclass
class Run:
    """One run's metric histories, read lazily from MLflow."""

    run_id: str
    name: str
    keys: list[str]
    client: object = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one metric, in step order; a clear error when the key is missing."""
        if key not in self.keys:
            family = key.split('/')[0] + '/'
            related = sorted(k for k in self.keys if k.startswith(family))
            listing = (
                f'Its {family} keys are: {_shorten(related)}'
                if related
                else f'It has no {family} keys (a plain run has no gates); its keys are: {_shorten(self.keys)}'
            )
            raise KeyError(f'Run {self.name!r} ({self.run_id}) has no metric {key!r}. {listing}.')
        if key not in self._cache:
            points = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
            self._cache[key] = ([m.step for m in points], [m.value for m in points])
        return self._cache[key]

    def layers(self) -> list[int]:
        return sorted({int(m.group(1)) for k in self.keys if (m := LAYER_KEY.match(k))})

    def spikes(self) -> list[dict]:
        """The spike post-mortems of this run, oldest first: ``{'spike', 'batch', 'step', 'baseline_steps',
        'rows': [(matrix, rise, update_ratio, baseline), ...]}``, read from its MLflow table artifacts."""
        if 'spikes' not in self._cache:
            found = []
            artifacts = self.client.list_artifacts(self.run_id, SPIKE_TABLE_DIR)
            tables = sorted(
                (int(m.group(1)), a.path) for a in artifacts if (m := _SPIKE_TABLE.match(os.path.basename(a.path)))
            )
            if tables:
                from unittest import mock

                # a few small JSON files: no download progress bar (it prints as a garbled line in logs)
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    mock.patch.dict(os.environ, {'MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR': 'false'}),
                ):
                    for _, path in tables:
                        with open(self.client.download_artifacts(self.run_id, path, tmp)) as f:
                            found.append(_spike_record(json.load(f)))
            self._cache['spikes'] = found
        return self._cache['spikes']


def _spike_record(table: dict) -> dict:
    """One post-mortem from an MLflow table (``{'columns': [...], 'data': [[...], ...]}``)."""
    rows = [dict(zip(table['columns'], row)) for row in table['data']]
    rows.sort(key=lambda r: r['rank'])
    first = rows[0]
    return {
        'spike': int(first['spike']),
        'batch': int(first['batch']),
        'step': int(first['step']),
        'baseline_steps': first['baseline_steps'],
        'rows': [(r['matrix'], float(r['rise']), float(r['update_ratio']), float(r['baseline'])) for r in rows],
    }


def load_runs(tracking_uri: str, runs: Sequence[str] = (), experiment: Optional[str] = None) -> list[Run]:
    """Runs by name or id (in that order) from the MLflow store at ``tracking_uri``.

    With no names: the newest run of each run name in ``experiment`` (or in the store), oldest
    first, so a name that was run again appears once. A name used by several runs picks the
    newest of them; runs named by id keep their own, and a name shown twice gets its id added.
    """
    from mlflow.tracking import MlflowClient

    if '://' not in tracking_uri and not tracking_uri.startswith('file:'):
        if not os.path.isdir(tracking_uri):
            raise FileNotFoundError(f'No MLflow store at {tracking_uri!r} (a folder such as ./mlruns, or a URI).')
        tracking_uri = os.path.abspath(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if experiment is not None:
        chosen = [e for e in experiments if e.name == experiment]
        if not chosen:
            raise ValueError(
                f'No experiment {experiment!r} in {tracking_uri}; experiments are: {[e.name for e in experiments]}.'
            )
        experiments = chosen
    found = client.search_runs([e.experiment_id for e in experiments], max_results=10000) if experiments else []
    if not runs:
        newest: dict = {}
        for r in sorted(found, key=lambda r: r.info.start_time or 0):
            newest[r.info.run_name or r.info.run_id] = r  # later runs of a name replace earlier ones
        selected = sorted(newest.values(), key=lambda r: r.info.start_time or 0)
        if not selected:
            raise ValueError(f'No runs in {tracking_uri} (experiments: {[e.name for e in experiments]}).')
    else:
        selected = []
        for wanted in runs:
            matches = [r for r in found if wanted in (r.info.run_id, r.info.run_name)]
            if not matches:
                names = sorted({r.info.run_name for r in found})
                raise ValueError(f'No run named or with id {wanted!r} in {tracking_uri}; runs are: {names}.')
            selected.append(max(matches, key=lambda r: r.info.start_time or 0))  # the newest of a name
    names = [r.info.run_name or r.info.run_id for r in selected]
    labels = [f'{name} ({r.info.run_id[:8]})' if names.count(name) > 1 else name for name, r in zip(names, selected)]
    return [Run(r.info.run_id, label, sorted(r.data.metrics), client) for r, label in zip(selected, labels)]


def _shorten(keys: list[str], limit: int = 12) -> str:
    return str(keys[:limit])[:-1] + (f', ... ({len(keys)} in all)]' if len(keys) > limit else ']')


def _pick_layer(runs: list[Run], layer: Optional[int]) -> int:
    layers = sorted(set.intersection(*(set(run.layers()) for run in runs)))
    if not layers:
        raise KeyError(
            f'No update_ratio/L{{layer}}/{{role}} keys common to runs {[r.name for r in runs]}; '
            f'keys of {runs[0].name!r}: {_shorten(runs[0].keys)}.',
        )
    if layer is None:
        return layers[-1]
    layer = layers[layer] if layer < 0 and -len(layers) <= layer else layer
    if layer not in layers:
        raise KeyError(f'Layer {layer} is not logged in every run; logged layers are {layers}.')
    return layer


def _figure(rows: int, height: float):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(7.5, height), sharex=True, squeeze=False)
    return plt, fig, axes[:, 0]


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps['tab10']
    return [cmap(i % 10) for i in range(n)]


def plot_update_ratios(runs: list[Run], path: str, layer: Optional[int] = None) -> str:
    """Figure 1: loss on top, ||dW_d||/||W_d|| and ||dW_u||/||W_u|| of ``layer`` (default: last) below."""
    layer = _pick_layer(runs, layer)
    plt, fig, (top, bottom) = _figure(2, 6.5)
    for run, color in zip(runs, _colors(len(runs))):
        steps, losses = run.history(LOSS_KEY)
        top.plot(
            [s + 1 for s in steps], losses, color=color, label=run.name
        )  # Composer logs a batch's loss at its 0-based index
        for role, style in ROLE_STYLES.items():
            steps, values = run.history(f'update_ratio/L{layer}/{role}')
            values = [v if v > 0 else math.nan for v in values]  # no update (lr 0) has no place on a log axis
            bottom.plot(steps, values, style, color=color, label=f'{run.name}: ||dW_{role}|| / ||W_{role}||')
        for i, spike in enumerate(run.spikes()):
            for ax in (top, bottom):
                ax.axvline(
                    spike['batch'],
                    color=color,
                    linestyle=':',
                    linewidth=1,
                    label=f'{run.name}: loss spikes' if i == 0 and ax is top else None,
                )
    top.set_ylabel('training loss')
    top.legend(fontsize='small', **LEGEND)
    bottom.set_yscale('log')
    bottom.set_ylabel(f'update ratio, layer {layer}')
    bottom.set_xlabel('step')
    bottom.legend(fontsize='small', **LEGEND)
    top.set_title(f'Loss and update ratios of W_d and W_u in layer {layer}')
    return _save(plt, fig, path)


def plot_param_norms(runs: list[Run], path: str, layer: Optional[int] = None) -> str:
    """Figure 3: ||W_d|| and ||W_u|| of ``layer`` (default: last) over steps."""
    layer = _pick_layer(runs, layer)
    plt, fig, (ax,) = _figure(1, 4.0)
    for run, color in zip(runs, _colors(len(runs))):
        for role, style in ROLE_STYLES.items():
            ax.plot(*run.history(f'param_norm/L{layer}/{role}'), style, color=color, label=f'{run.name}: ||W_{role}||')
    ax.set_ylabel(f'parameter norm, layer {layer}')
    ax.set_xlabel('step')
    ax.legend(fontsize='small', **LEGEND)
    ax.set_title(f'Norms of the actual W_d and W_u in layer {layer}')
    return _save(plt, fig, path)


def _mean(run: Run, key: str, stat: str) -> float:
    return _REDUCE[stat](run.history(key)[1])


def heatmap_table(run: Run, stat: str = 'mean') -> tuple[list[int], list[str], list[list[float]]]:
    """Layers x roles of one run: ``stat`` ('mean', 'median' or 'max') of the update ratio over its logged steps."""
    if stat not in _REDUCE:
        raise ValueError(f'stat must be one of {sorted(_REDUCE)}, got {stat!r}.')
    layers = run.layers()
    roles = [r for r in LAYERED_ROLES if any(k == f'update_ratio/L{layers[0]}/{r}' for k in run.keys)] if layers else []
    if not roles:
        raise KeyError(
            f'Run {run.name!r} has no update_ratio/L{{layer}}/{{role}} keys; its keys: {_shorten(run.keys)}.'
        )
    table = [[_REDUCE[stat](run.history(f'update_ratio/L{layer}/{role}')[1]) for role in roles] for layer in layers]
    return layers, roles, table


def plot_heatmap(runs: list[Run], path: str, stat: str = 'mean') -> str:
    """Layers x roles heatmap of update ratios, one panel per run, on one log color scale."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    tables = [heatmap_table(run, stat) for run in runs]
    values = [v for _, _, t in tables for row in t for v in row if v > 0 and math.isfinite(v)]
    norm = LogNorm(vmin=min(values), vmax=max(values)) if values else None
    n_layers = max(len(layers) for layers, _, _ in tables)
    fig, axes = plt.subplots(
        1,
        len(runs),
        figsize=(1.0 + 3.2 * len(runs), 1.6 + 0.32 * n_layers),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for ax, run, (layers, roles, table) in zip(axes[0], runs, tables):
        image = ax.imshow(table, norm=norm, cmap='viridis', aspect='auto', origin='lower')
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel('role')
        extra = [
            f'{role} {_mean(run, f"update_ratio/{role}", stat):.2g}'
            for role in ('e', 'p')
            if f'update_ratio/{role}' in run.keys
        ]
        ax.set_title(f'{run.name}' + (f' ({", ".join(extra)})' if extra else ''), fontsize='medium')
        if len(layers) <= 16:
            for i, row in enumerate(table):
                for j, value in enumerate(row):
                    bright = norm is not None and value > 0 and norm(value) > 0.6
                    ax.text(
                        j, i, f'{value:.2g}', ha='center', va='center', fontsize=7, color='black' if bright else 'white'
                    )
    axes[0][0].set_ylabel('layer')
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=f'{stat} update ratio ||dW|| / ||W||')
    return _save(plt, fig, path)


def plot_spikes(runs: list[Run], path: str, top: int = SPIKE_MATRICES) -> Optional[str]:
    """The spike post-mortems: per spike, the ``top`` matrices whose update ratio rose most before it.

    One panel per spike (the first spikes of each run, ``SPIKE_PANELS`` in all); bars are
    rise = ratio at the last logged step before the spike / its median at the earlier kept steps.
    None (nothing written) when no run has a spike table.
    """
    panels = []
    per_run = max(1, SPIKE_PANELS // max(1, sum(1 for run in runs if run.spikes())))
    for run, color in zip(runs, _colors(len(runs))):
        panels += [(run, color, spike) for spike in run.spikes()[:per_run]]
    panels = panels[:SPIKE_PANELS]
    if not panels:
        return None
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 0.6 + (0.3 * top + 0.9) * len(panels)), squeeze=False)
    for ax, (run, color, spike) in zip(axes[:, 0], panels):
        rows = [r for r in spike['rows'] if math.isfinite(r[1]) and r[1] > 0][:top]
        names = [r[0] for r in rows][::-1]
        rises = [r[1] for r in rows][::-1]
        ax.barh(range(len(rows)), rises, color=color)
        ax.set_yticks(range(len(rows)), names)
        ax.set_xscale('log')
        ax.axvline(1.0, color='grey', linewidth=0.8)
        for y, (rise, row) in enumerate(zip(rises, rows[::-1])):
            ax.text(rise, y, f' x{rise:.3g} ({row[3]:.2g} -> {row[2]:.2g})', va='center', fontsize=7)
        ax.set_title(
            f'{run.name}: loss spike {spike["spike"]} at batch {spike["batch"]:,}; update ratio at step '
            f'{spike["step"]:,} over its median at steps {spike["baseline_steps"]}',
            fontsize='small',
        )
        ax.margins(x=0.35)
    axes[-1, 0].set_xlabel('rise of the update ratio ||dW|| / ||W|| before the spike (log scale)')
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path


def plot_runs(
    runs: list[Run],
    out_dir: str,
    layer: Optional[int] = None,
    stat: str = 'mean',
    notes: Optional[list[str]] = None,
) -> list[str]:
    """The pictures for ``runs`` into ``out_dir``; returns the paths written.

    Figure 1 and the heatmap always; Figure 3 when every run logs ``param_norm/`` of the layer;
    the spike post-mortem when a run has one. What is left out is said in ``notes``.
    """
    layer = _pick_layer(runs, layer)
    notes = notes if notes is not None else []
    written = [plot_update_ratios(runs, os.path.join(out_dir, f'update_ratio_L{layer}.png'), layer)]
    missing = [run.name for run in runs if f'param_norm/L{layer}/d' not in run.keys]
    if missing:
        notes.append(
            f'param_norm_L{layer}.png left out: runs {missing} log no param_norm/L{layer}/ keys '
            "(update_ratio_monitor's families)"
        )
    else:
        written.append(plot_param_norms(runs, os.path.join(out_dir, f'param_norm_L{layer}.png'), layer))
    written.append(plot_heatmap(runs, os.path.join(out_dir, 'update_ratio_heatmap.png'), stat))
    spikes = plot_spikes(runs, os.path.join(out_dir, 'spike_post_mortem.png'))
    if spikes is not None:
        written.append(spikes)
    return written


DEFAULT_STORES = ('./runs/mlruns', './mlruns')  # the demo YAML's store, then MLflow's default folder


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the first of :data:`DEFAULT_STORES` that exists; an error naming both if none."""
    if os.environ.get('MLFLOW_TRACKING_URI'):
        return os.environ['MLFLOW_TRACKING_URI']
    for folder in DEFAULT_STORES:
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(
        f'No MLflow store in {" or ".join(DEFAULT_STORES)} (from {os.getcwd()}; the demo YAML logs to '
        f'{DEFAULT_STORES[0]}, `wesar-demo` to runs/demo/mlruns): pass --tracking-uri.'
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='wesar-plot', description=cast(str, __doc__).split('\n\n')[0])
    parser.add_argument(
        '--tracking-uri',
        default=None,
        help='MLflow store: a local folder or a server URI (default: $MLFLOW_TRACKING_URI, else '
        f'the first of {", ".join(DEFAULT_STORES)} that exists)',
    )
    parser.add_argument(
        '--runs', nargs='*', default=(), help='run names or ids to overlay (default: the newest run of each name)'
    )
    parser.add_argument('--experiment', default=None, help='only runs of this experiment')
    parser.add_argument(
        '--layer', type=int, default=None, help='layer of the line plots (default: the last; -1 counts back)'
    )
    parser.add_argument(
        '--stat', default='mean', choices=('mean', 'median', 'max'), help='heatmap statistic over steps'
    )
    parser.add_argument('--out', default='plots', help='folder for the PNGs (default: ./plots)')
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.tracking_uri or default_tracking_uri(), args.runs, args.experiment)
        notes: list[str] = []
        paths = plot_runs(runs, args.out, args.layer, args.stat, notes)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f'wesar-plot: {err.args[0] if err.args else err}', file=sys.stderr)
        return 2
    for note in notes:
        print(f'wesar-plot: {note}', file=sys.stderr)
    for path in paths:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
