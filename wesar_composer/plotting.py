"""Draw the paper's pictures from runs in an MLflow store: ``wesar-plot``.

Reads the keys that :class:`~wesar_composer.callbacks.UpdateRatioMonitor` logs and writes PNGs:

- ``update_ratio_L{layer}.png``: training loss over steps on top; the update ratios of W_d and
  W_u of one layer below (Figure 1 of Nishida et al. 2024). The x axis counts batches from 1:
  the update ratio logged at step n is that of batch n, whose loss Composer logs at step n - 1.
- ``param_norm_L{layer}.png``: ||W_d|| and ||W_u|| of that layer over steps (Figure 3).
- ``update_ratio_heatmap.png``: layers x roles, the mean update ratio over the logged steps,
  one panel per run on a shared log color scale; e and p in the panel titles.

Several runs overlay with a legend (for example the Small-init baseline and WeSaR).

    wesar-plot --tracking-uri ./mlruns --runs baseline wesar --out plots/
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

LOSS_KEY = 'loss/train/total'
LAYERED_ROLES = ('q', 'k', 'v', 'o', 'g', 'u', 'd')
ROLE_STYLES = {'d': '-', 'u': '--'}
_REDUCE = {'mean': statistics.fmean, 'median': statistics.median, 'max': max}
_LAYER_KEY = re.compile(r'^update_ratio/L(\d+)/([a-z])$')


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
            listing = f'Its {family} keys are: {_shorten(related)}' if related else \
                f'It has no {family} keys (a plain run has no gates); its keys are: {_shorten(self.keys)}'
            raise KeyError(f'Run {self.name!r} ({self.run_id}) has no metric {key!r}. {listing}.')
        if key not in self._cache:
            points = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
            self._cache[key] = ([m.step for m in points], [m.value for m in points])
        return self._cache[key]

    def layers(self) -> list[int]:
        return sorted({int(m.group(1)) for k in self.keys if (m := _LAYER_KEY.match(k))})


def load_runs(tracking_uri: str, runs: Sequence[str] = (), experiment: Optional[str] = None) -> list[Run]:
    """Runs by name or id (in that order) from the MLflow store at ``tracking_uri``.

    With no names: every run of ``experiment`` (or of the store), oldest first. A name used by
    several runs picks the newest of them.
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
            raise ValueError(f'No experiment {experiment!r} in {tracking_uri}; experiments are: {[e.name for e in experiments]}.')
        experiments = chosen
    found = client.search_runs([e.experiment_id for e in experiments], max_results=10000) if experiments else []
    if not runs:
        selected = sorted(found, key=lambda r: r.info.start_time or 0)
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
    return [Run(r.info.run_id, r.info.run_name or r.info.run_id, sorted(r.data.metrics), client) for r in selected]


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
        top.plot([s + 1 for s in steps], losses, color=color, label=run.name)  # Composer logs a batch's loss at its 0-based index
        for role, style in ROLE_STYLES.items():
            steps, values = run.history(f'update_ratio/L{layer}/{role}')
            values = [v if v > 0 else math.nan for v in values]  # no update (lr 0) has no place on a log axis
            bottom.plot(steps, values, style, color=color, label=f'{run.name}: ||dW_{role}|| / ||W_{role}||')
    top.set_ylabel('training loss')
    top.legend()
    bottom.set_yscale('log')
    bottom.set_ylabel(f'update ratio, layer {layer}')
    bottom.set_xlabel('step')
    bottom.legend(fontsize='small')
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
    ax.legend(fontsize='small')
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
        raise KeyError(f'Run {run.name!r} has no update_ratio/L{{layer}}/{{role}} keys; its keys: {_shorten(run.keys)}.')
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
        1, len(runs), figsize=(1.0 + 3.2 * len(runs), 1.6 + 0.32 * n_layers), squeeze=False, constrained_layout=True,
    )
    image = None
    for ax, run, (layers, roles, table) in zip(axes[0], runs, tables):
        image = ax.imshow(table, norm=norm, cmap='viridis', aspect='auto', origin='lower')
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel('role')
        extra = [f'{role} {_mean(run, f"update_ratio/{role}", stat):.2g}' for role in ('e', 'p') if f'update_ratio/{role}' in run.keys]
        ax.set_title(f'{run.name}' + (f' ({", ".join(extra)})' if extra else ''), fontsize='medium')
        if len(layers) <= 16:
            for i, row in enumerate(table):
                for j, value in enumerate(row):
                    bright = norm is not None and value > 0 and norm(value) > 0.6
                    ax.text(j, i, f'{value:.2g}', ha='center', va='center', fontsize=7, color='black' if bright else 'white')
    axes[0][0].set_ylabel('layer')
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=f'{stat} update ratio ||dW|| / ||W||')
    return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path


def plot_runs(runs: list[Run], out_dir: str, layer: Optional[int] = None, stat: str = 'mean') -> list[str]:
    """All three pictures for ``runs`` into ``out_dir``; returns the paths written."""
    layer = _pick_layer(runs, layer)
    return [
        plot_update_ratios(runs, os.path.join(out_dir, f'update_ratio_L{layer}.png'), layer),
        plot_param_norms(runs, os.path.join(out_dir, f'param_norm_L{layer}.png'), layer),
        plot_heatmap(runs, os.path.join(out_dir, 'update_ratio_heatmap.png'), stat),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='wesar-plot', description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--tracking-uri', default=os.environ.get('MLFLOW_TRACKING_URI', './mlruns'),
        help='MLflow store: a local folder (default ./mlruns, or $MLFLOW_TRACKING_URI) or a server URI',
    )
    parser.add_argument('--runs', nargs='*', default=(), help='run names or ids to overlay (default: all runs)')
    parser.add_argument('--experiment', default=None, help='only runs of this experiment')
    parser.add_argument('--layer', type=int, default=None, help='layer of the line plots (default: the last; -1 counts back)')
    parser.add_argument('--stat', default='mean', choices=('mean', 'median', 'max'), help='heatmap statistic over steps')
    parser.add_argument('--out', default='plots', help='folder for the PNGs (default: ./plots)')
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.tracking_uri, args.runs, args.experiment)
        paths = plot_runs(runs, args.out, args.layer, args.stat)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f'wesar-plot: {err.args[0] if err.args else err}', file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
