"""The reproduction (``wesar-experiments``): the paper's claims tested at CPU scale through llm-foundry.

Every run is ``yamls/demo/demo.yaml`` trained by llm-foundry's own train path
(:func:`wesar_composer.demo.train_one`), with the method's algorithms taken from the paper
recipes' parts (``yamls/parts/method/*.yaml``) and the setting (rapid / stable) scaled down:

- ``main``: Small init (rapid), Small init (stable), He init, WeSaR, WeSaR with the Small
  backbone, WeSaR with fixed gates; several seeds; two model shapes (``base`` and the deep,
  narrow ``deep``) (Tables 5 and 7 in miniature);
- ``reparam``: Weight Normalization, sigma-Reparam (pre-LN), residual scaling (He and Small)
  beside Small init and WeSaR (Table 6 in miniature);
- ``lr``: the learning rate swept upward for Small init and WeSaR, loss spikes and divergences
  counted by ``loss_spike_counter`` (the stress test standing in for the 13B spikes).

Runs of Small init and WeSaR with the first seed log ``update_ratio_monitor`` to a local MLflow
store; ``wesar-plot``'s functions draw Figure 1 / 3 and the heatmap from it. Every finished run
appends one row to ``results.csv`` and its loss curve to ``curves.json`` (a rerun skips the
finished ones), then the figures are drawn and the generated tables of the results page are
refreshed.

    wesar-experiments --quick --out /tmp/repro            # a few minutes: the pipeline end to end
    wesar-experiments --out runs/reproduction --jobs 2    # the full grid: 96 runs, under an hour on 2 cores
    wesar-experiments --render docs/reproduction --page docs/reproduction.md   # figures and page tables only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = [
    'METHODS', 'SHAPES', 'SETTINGS', 'RunSpec', 'Row', 'plan', 'run_grid', 'render_tables',
    'render_page', 'main',
]

REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD_PARTS = REPO_ROOT / 'yamls' / 'parts' / 'method'
RESULTS_CSV = 'results.csv'
CURVES_JSON = 'curves.json'
RECORDER_CALLBACK = 'wesar_experiment_recorder'

# method key -> (label, method part in yamls/parts/method, setting)
METHODS: dict[str, tuple[str, str, str]] = {
    'small_rapid': ('Small init (rapid)', 'small_init', 'rapid'),
    'small_stable': ('Small init (stable)', 'small_init', 'stable'),
    'he': ('He init', 'he_init', 'rapid'),
    'wesar': ('WeSaR', 'wesar', 'rapid'),
    'wesar_small': ('WeSaR w/ Small backbone', 'wesar_small_backbone', 'rapid'),
    'wesar_fixed': ('WeSaR w/ fixed gates', 'wesar_fixed_gates', 'rapid'),
    'weight_norm': ('Weight Normalization', 'weight_norm', 'rapid'),
    'sigma_reparam': ('sigma-Reparam (pre-LN)', 'sigma_reparam', 'rapid'),
    'residual_scaling_he': ('Residual scaling w/ He', 'residual_scaling_he', 'rapid'),
    'residual_scaling_small': ('Residual scaling w/ Small', 'residual_scaling_small', 'rapid'),
}
MAIN_METHODS = ('small_rapid', 'small_stable', 'he', 'wesar', 'wesar_small', 'wesar_fixed')
REPARAM_METHODS = ('weight_norm', 'sigma_reparam', 'residual_scaling_he', 'residual_scaling_small')
LR_METHODS = ('small_rapid', 'wesar')
FIGURE_METHODS = ('small_rapid', 'wesar')  # these, first seed: update-ratio monitor and MLflow

# Model shapes: d_model, n_layers, n_heads. `deep` is deep and narrow: 1/sqrt(2N) = 1/sqrt(32).
SHAPES: dict[str, dict[str, int]] = {
    'base': {'d_model': 64, 'n_layers': 4, 'n_heads': 4},
    'deep': {'d_model': 32, 'n_layers': 16, 'n_heads': 4},
}


@dataclass(frozen=True)
class Scale:
    """The CPU scale of a grid: data, batch, steps. The settings below are relative to it."""
    vocab_size: int
    seq_len: int
    batch: int  # rapid batch, sequences; stable uses 4x, as 1M vs 4M tokens in the paper
    steps: int  # rapid steps; stable runs the same tokens in steps / 4
    eval_batches: int  # validation batches of 64 sequences, the same ones for every run
    monitor_interval: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    shapes: tuple[str, ...]
    lr_shapes: tuple[str, ...]
    reparam_shapes: tuple[str, ...]
    reparam_seeds: tuple[int, ...]
    max_chars: Optional[int] = None
    every_method_every_shape: bool = True  # False: shapes after the first run Small init and WeSaR only
    lr_seeds: tuple[int, ...] = (0,)  # the first one runs before Table 6, the others last


FULL = Scale(vocab_size=1024, seq_len=64, batch=16, steps=240, eval_batches=8, monitor_interval=4,
             seeds=(0, 1, 2), lrs=(3e-4, 3e-3, 1e-2, 3e-2), shapes=('base', 'deep'), lr_shapes=('deep', 'base'),
             reparam_shapes=('base',), reparam_seeds=(0, 1, 2), lr_seeds=(0, 1, 2))
QUICK = Scale(vocab_size=512, seq_len=64, batch=4, steps=8, eval_batches=1, monitor_interval=2,
              seeds=(0,), lrs=(1e-2,), shapes=('base', 'deep'), lr_shapes=('base',),
              reparam_shapes=('base',), reparam_seeds=(0,), max_chars=300_000,
              every_method_every_shape=False)
QUICK_SHAPES = {'base': {'d_model': 32, 'n_layers': 2, 'n_heads': 2},
                'deep': {'d_model': 16, 'n_layers': 6, 'n_heads': 2}}

# The paper's settings (Table 3): rapid 1M-token batches, lr 1e-3, warmup 100 of ~28.6k steps;
# stable 4M-token batches, lr 5e-4, warmup 2000 of ~7.2k steps; both 30B tokens.
SETTINGS = {
    'rapid': {'batch_factor': 1, 'lr': 1e-3, 'warmup_fraction': 100 / 28_610},
    'stable': {'batch_factor': 4, 'lr': 5e-4, 'warmup_fraction': 2000 / 7_153},
}
MIN_WARMUP = 2  # batches; the rapid fraction rounds to 0 at CPU scale


TAG = 'wesar-experiments'


def _say(line: str) -> None:
    print(f'[{TAG}] {line}', flush=True)


# ------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class RunSpec:
    group: str  # main | reparam | lr
    method: str
    shape: str
    seed: int
    lr: float
    monitor: bool = False

    @property
    def name(self) -> str:
        return f'{self.group}-{self.shape}-{self.method}-lr{self.lr:g}-s{self.seed}'


def plan(scale: Scale, groups: Sequence[str] = ('main', 'reparam', 'lr')) -> list[RunSpec]:
    """The runs of a grid, the most informative first: two seeds of the main grid, the lr sweep,
    the compared reparameterizations, then the other seeds of the main grid and of the lr sweep
    (a deadline cuts from the end)."""
    specs: list[RunSpec] = []

    def main_runs(seeds):
        for seed in seeds:
            for i, shape in enumerate(scale.shapes):
                methods = MAIN_METHODS if i == 0 or scale.every_method_every_shape else FIGURE_METHODS
                for method in methods:
                    monitor = method in FIGURE_METHODS and seed == scale.seeds[0]
                    specs.append(RunSpec('main', method, shape, seed, SETTINGS[METHODS[method][2]]['lr'], monitor))

    if 'main' in groups:
        main_runs(scale.seeds[:2])
    def lr_runs(seeds):
        for seed in seeds:
            for shape in scale.lr_shapes:
                for lr in scale.lrs:
                    for method in LR_METHODS:
                        specs.append(RunSpec('lr', method, shape, seed, lr))

    if 'lr' in groups:
        lr_runs(scale.lr_seeds[:1])
    if 'reparam' in groups:
        for seed in scale.reparam_seeds:
            for shape in scale.reparam_shapes:
                for method in REPARAM_METHODS:
                    specs.append(RunSpec('reparam', method, shape, seed, SETTINGS[METHODS[method][2]]['lr']))
    if 'main' in groups:
        main_runs(scale.seeds[2:])
    if 'lr' in groups:
        lr_runs(scale.lr_seeds[1:])
    return specs


def run_settings(spec: RunSpec, scale: Scale) -> dict[str, Any]:
    """Batch, steps, warmup and lr of one run: the paper's setting mapped onto ``scale``."""
    setting = SETTINGS[METHODS[spec.method][2]]
    factor = setting['batch_factor']
    steps = max(scale.steps // factor, 1)
    warmup = max(MIN_WARMUP, round(setting['warmup_fraction'] * steps))
    return {'setting': METHODS[spec.method][2], 'batch': scale.batch * factor, 'steps': steps,
            'warmup': min(warmup, steps), 'lr': spec.lr, 'tokens': scale.batch * factor * steps * scale.seq_len}


def _method_algorithms(method: str) -> dict[str, Any]:
    from omegaconf import OmegaConf as om

    part = om.to_container(om.load(METHOD_PARTS / f'{METHODS[method][1]}.yaml'))['algorithms']
    return {'gradient_clipping': '${variables.clipping}', 'z_loss': '${variables.z_loss}', **part}


def build_config(spec: RunSpec, scale: Scale, shapes: dict[str, dict[str, int]], data_root: str,
                 tracking_uri: str, out_dir: Path):
    """The demo YAML with this run's method, shape, seed, setting, callbacks and logger."""
    from omegaconf import OmegaConf as om

    from wesar_composer import demo

    s = run_settings(spec, scale)
    shape = shapes[spec.shape]
    cfg = demo.load_config(demo.find_demo_yaml(), [])
    container = om.to_container(cfg, resolve=False)
    container['variables'].update({
        'data_root': data_root, 'vocab_size': scale.vocab_size, 'max_seq_len': scale.seq_len,
        'global_seed': spec.seed, 'run_name': spec.name, 'mlflow_experiment': 'wesar-reproduction',
        'mlflow_tracking_uri': tracking_uri,
    })
    container['variables']['algorithms_of'] = {spec.method: _method_algorithms(spec.method)}
    container['model'].update(shape)
    container.update({
        'global_train_batch_size': s['batch'], 'device_train_microbatch_size': s['batch'],
        'max_duration': f'{s["steps"]}ba', 'eval_interval': f'{s["steps"]}ba',
        'eval_subset_num_batches': scale.eval_batches,
    })
    container['optimizer']['lr'] = s['lr']
    # torch-AdamW weight decay 0.01 at the run's lr, written for Composer's decoupled_adamw
    container['optimizer']['weight_decay'] = 0.01 * s['lr']
    container['scheduler']['t_warmup'] = f'{s["warmup"]}ba'
    callbacks = container['callbacks']
    callbacks.pop('speed_monitor', None)
    callbacks[RECORDER_CALLBACK] = {'path': str(out_dir / 'curves' / f'{spec.name}.json')}
    if spec.monitor:
        # every layer: the heatmap and the d/u gap of each layer
        callbacks['update_ratio_monitor'] = {'log_interval': scale.monitor_interval, 'layers': 'all'}
    else:
        callbacks.pop('update_ratio_monitor', None)
        container['loggers'] = {}
    return om.create(container)


class LossRecorder(Callback):
    """Keeps the training loss and the time of every batch; writes them as JSON at the end of training."""

    def __init__(self, path: str):
        self.path = path
        self.losses: list[float] = []
        self.batch_seconds: list[float] = []
        self._t: Optional[float] = None

    def batch_start(self, state: State, logger: Logger) -> None:
        self._t = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._t is not None:
            self.batch_seconds.append(time.perf_counter() - self._t)
        loss = state.total_loss_dict.get('loss/train/total')
        self.losses.append(float(loss) if loss is not None else float('nan'))

    def fit_end(self, state: State, logger: Logger) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps({
            'loss': [None if not math.isfinite(x) else x for x in self.losses],
            'batch_s': self.batch_seconds,
        }))


def _register_callbacks() -> None:
    from llmfoundry import registry

    from wesar_composer import demo

    demo._register_progress_callback()
    if RECORDER_CALLBACK not in registry.callbacks:
        registry.callbacks.register(RECORDER_CALLBACK, func=LossRecorder)


# ------------------------------------------------------------------------------ one run


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


CSV_FIELDS = [f.name for f in fields(Row)]


def diverged(val_loss: float, losses: Sequence[Optional[float]]) -> bool:
    """Diverged: a non-finite loss, or a training loss at the end (mean of the last 10 batches) no
    lower than at the first batch."""
    if not math.isfinite(val_loss) or not losses or any(x is None for x in losses):
        return True
    return statistics.fmean(losses[-10:]) >= losses[0]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from wesar_composer import demo

    demo.quiet_known_noise()  # the rest of a run's output goes to its log file


def run_one(spec: RunSpec, scale: Scale, shapes: dict[str, dict[str, int]], data_root: str, out_dir: str) -> dict:
    """Train one run through llm-foundry (``demo.train_one``) and return its :class:`Row` as a dict."""
    from wesar_composer import demo

    out = Path(out_dir)
    _register_callbacks()
    tracking_uri = str((out / 'mlruns').resolve())
    cfg = build_config(spec, scale, shapes, data_root, tracking_uri, out)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    result = demo.train_one(cfg, spec.method, out / 'logs' / f'{spec.name}.log', tag=TAG, label=spec.name)
    d_over_u_last = float('nan')
    if result.run_id is not None:
        _, last = demo.update_ratio_gap(tracking_uri, result.run_id)
        d_over_u_last = float('nan') if last is None else last
    record = json.loads((out / 'curves' / f'{spec.name}.json').read_text())
    losses = record['loss']
    finite = [x for x in losses if x is not None]
    s = run_settings(spec, scale)
    shape = shapes[spec.shape]
    row = Row(
        group=spec.group, method=spec.method, label=METHODS[spec.method][0], shape=spec.shape,
        d_model=shape['d_model'], n_layers=shape['n_layers'], seed=spec.seed, setting=s['setting'],
        lr=spec.lr, batch=s['batch'], steps=result.batches, warmup=s['warmup'], tokens=result.tokens,
        n_params=result.n_params, val_loss=result.val_loss, val_ppl=result.val_perplexity,
        final_train_loss=statistics.fmean(finite[-10:]) if finite else float('nan'),
        spikes=int(result.spikes or 0),
        diverged=int(diverged(result.val_loss, losses)),
        d_over_u_last=d_over_u_last, wall_s=result.wall_seconds,
        batch_s=statistics.median(record['batch_s']) if record['batch_s'] else float('nan'), run_name=spec.name,
        run_id=result.run_id or '',
    )
    return asdict(row)


# ------------------------------------------------------------------------------ the grid runner


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline='') as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for name in ('d_model', 'n_layers', 'seed', 'batch', 'steps', 'warmup', 'tokens', 'n_params',
                         'spikes', 'diverged'):
                row[name] = int(row[name])
            for name in ('lr', 'val_loss', 'val_ppl', 'final_train_loss', 'd_over_u_last', 'wall_s', 'batch_s'):
                row[name] = float(row[name]) if row[name] not in ('', None) else float('nan')
            rows.append(row)
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_grid(out_dir: Path, scale: Scale, shapes: dict[str, dict[str, int]], groups: Sequence[str],
             jobs: int = 1, data_root: Optional[str] = None, deadline_s: Optional[float] = None) -> list[dict]:
    """Run every planned run not yet in ``results.csv``; ``jobs`` processes of one torch thread each.

    ``deadline_s``: no run starts after this many seconds (the ones left are reported as cut).
    """
    from wesar_composer.data import build_dataset, default_output_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    data = build_dataset(data_root or default_output_dir(scale.vocab_size, scale.seq_len, scale.max_chars),
                         vocab_size=scale.vocab_size, seq_len=scale.seq_len, max_chars=scale.max_chars,
                         progress=lambda line: _say(f'data: {line}'))
    results_path = out_dir / RESULTS_CSV
    done = {r['run_name'] for r in read_results(results_path)}
    todo = [s for s in plan(scale, groups) if s.name not in done]
    _say(f'{len(todo)} runs to make ({len(done)} already in {results_path}), {jobs} at a time')
    start = time.perf_counter()
    queue = list(todo)

    def record(spec: RunSpec, row: dict) -> None:
        _append_row(results_path, row)
        _say(f'{spec.name}: val loss {row["val_loss"]:.3f} (ppl {row["val_ppl"]:.1f}), spikes '
             f'{row["spikes"]}, diverged {row["diverged"]}, {row["wall_s"]:.0f} s '
             f'[{(time.perf_counter() - start) / 60:.1f} min]')

    if jobs == 1:  # in this process
        while queue and (deadline_s is None or time.perf_counter() - start < deadline_s):
            spec = queue.pop(0)
            record(spec, run_one(spec, scale, shapes, str(data.root.resolve()), str(out_dir)))
    else:
        _run_pool(queue, jobs, deadline_s, start, record, scale, shapes, str(data.root.resolve()), str(out_dir))
    if queue:
        _say(f'deadline reached: {len(queue)} runs not started: {[s.name for s in queue]}')
    (out_dir / 'grid.json').write_text(json.dumps({
        'scale': asdict(scale), 'shapes': shapes, 'groups': list(groups), 'jobs': jobs,
        'planned': [s.name for s in plan(scale, groups)], 'not_started': [s.name for s in queue],
        'data': {'root': str(data.root), 'train_tokens': data.tokens['train'], 'val_tokens': data.tokens['val']},
    }, indent=1))
    return read_results(results_path)


def _run_pool(queue, jobs, deadline_s, start, record, scale, shapes, data_root, out_dir) -> None:
    """``jobs`` worker processes of one torch thread each; a failed run is reported, the rest go on."""
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(1,),
                             mp_context=multiprocessing.get_context('spawn')) as pool:
        pending = {}

        def submit_next() -> None:
            if queue and (deadline_s is None or time.perf_counter() - start < deadline_s):
                spec = queue.pop(0)
                pending[pool.submit(run_one, spec, scale, shapes, data_root, out_dir)] = spec

        for _ in range(jobs):
            submit_next()
        while pending:
            future = next(as_completed(pending))
            spec = pending.pop(future)
            try:
                row = future.result()
            except Exception as e:  # noqa: BLE001 - a failed run is reported, the grid goes on
                _say(f'{spec.name}: FAILED: {type(e).__name__}: {e}')
            else:
                record(spec, row)
            submit_next()


# ------------------------------------------------------------------------------ tables


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan'), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _ms(values: Sequence[float], spec: str = '.3f') -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return '-'
    return f'{mean:{spec}} ± {std:{spec}}' if n > 1 else f'{mean:{spec}}'


# The paper's figures (1.3B, WikiText / LAMBADA perplexity): Tables 5 and 7 (30B tokens), Table 6
# (10B tokens, mean (std) of five runs, time in hours with the overhead vs Small init).
PAPER_T57 = {
    'small_rapid': '16.55 / 26.29', 'small_stable': '21.44 / 28.81', 'he': '16.70 / 26.50',
    'wesar': '14.51 / 22.87', 'wesar_small': '15.91 / 24.37', 'wesar_fixed': '15.21 / 25.61',
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
    lines = ['| method | val loss | val perplexity | Δ loss vs Small (rapid) | spikes | seeds | wall time / run | paper 1.3B (WikiText / LAMBADA ppl) |',
             '|---|---|---|---|---|---|---|---|']
    base = _stats([r['val_loss'] for r in _select(rows, group='main', shape=shape, method='small_rapid')])[0]
    for method in MAIN_METHODS:
        sel = _select(rows, group='main', shape=shape, method=method)
        if not sel:
            continue
        mean = _stats([r['val_loss'] for r in sel])[0]
        delta = f'{mean - base:+.3f}' if method != 'small_rapid' and math.isfinite(base) else '-'
        lines.append(
            f'| {METHODS[method][0]} | {_ms([r["val_loss"] for r in sel])} | {_ms([r["val_ppl"] for r in sel], ".1f")} | '
            f'{delta} | {sum(r["spikes"] for r in sel)} | {len(sel)} | {_ms([r["wall_s"] for r in sel], ".0f")} s | '
            f'{PAPER_T57[method]} |')
    return '\n'.join(lines)


def table_reparam(rows: list[dict]) -> str:
    lines = ['| method | val loss | val perplexity | spikes | runs | wall time / run | s / batch (median) | batch time vs Small | paper 1.3B, 10B tokens (ppl WikiText / LAMBADA) | paper time |',
             '|---|---|---|---|---|---|---|---|---|---|']
    shapes = sorted({r['shape'] for r in rows if r['group'] == 'reparam'})
    for shape in shapes:
        seeds = sorted({r['seed'] for r in rows if r['group'] == 'reparam' and r['shape'] == shape})

        def pick(method):
            if method in ('small_rapid', 'wesar'):
                return [r for r in _select(rows, group='main', shape=shape, method=method) if r['seed'] in seeds]
            return _select(rows, group='reparam', shape=shape, method=method)

        base_batch = _stats([r['batch_s'] for r in pick('small_rapid')])[0]
        for method in ('small_rapid',) + REPARAM_METHODS + ('wesar',):
            sel = pick(method)
            if not sel:
                continue
            batch = _stats([r['batch_s'] for r in sel])[0]
            rel = f'{100 * (batch / base_batch - 1):+.0f}%' if method != 'small_rapid' and math.isfinite(base_batch) else '-'
            paper_ppl, paper_time = PAPER_T6[method]
            lines.append(
                f'| {METHODS[method][0]} ({shape}) | {_ms([r["val_loss"] for r in sel])} | '
                f'{_ms([r["val_ppl"] for r in sel], ".1f")} | {sum(r["spikes"] for r in sel)} | {len(sel)} | '
                f'{_ms([r["wall_s"] for r in sel], ".0f")} s | {_ms([r["batch_s"] for r in sel], ".3f")} | {rel} | '
                f'{paper_ppl} | {paper_time} |')
    return '\n'.join(lines)


def table_lr(rows: list[dict]) -> str:
    lines = ['| shape | method | lr | val loss | runs with a spike | spikes | diverged | seeds |',
             '|---|---|---|---|---|---|---|---|']
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
                lines.append(f'| {shape} | {METHODS[method][0]} | {lr:g} | {_ms([r["val_loss"] for r in at])} | '
                             f'{spiked} / {len(at)} | {sum(r["spikes"] for r in at)} | {div} / {len(at)} | {len(at)} |')
                if not spiked and not div:
                    clean.append(lr)
            summary.append(f'- {shape}, {METHODS[method][0]}: largest lr with no spike or divergence in any seed: '
                           f'{max(clean):g}' if clean else
                           f'- {shape}, {METHODS[method][0]}: every lr tried spiked or diverged')
    return '\n'.join(lines + [''] + summary)


def table_d_over_u(rows: list[dict]) -> str:
    lines = ['| shape | method | median ratio(W_d) / ratio(W_u), last layer | sqrt(2N) |', '|---|---|---|---|']
    for r in rows:
        if r['group'] == 'main' and math.isfinite(r['d_over_u_last']):
            lines.append(f'| {r["shape"]} (d {r["d_model"]}, N {r["n_layers"]}) | {r["label"]} | '
                         f'{r["d_over_u_last"]:.2f} | {math.sqrt(2 * r["n_layers"]):.2f} |')
    return '\n'.join(lines)


def table_wall(rows: list[dict]) -> str:
    total = sum(r['wall_s'] for r in rows)
    lines = ['| group | shape | runs | wall time per run (mean ± std) | total |', '|---|---|---|---|---|']
    for group in ('main', 'reparam', 'lr'):
        for shape in sorted({r['shape'] for r in rows if r['group'] == group}):
            sel = _select(rows, group=group, shape=shape)
            lines.append(f'| {group} | {shape} | {len(sel)} | {_ms([r["wall_s"] for r in sel], ".0f")} s | '
                         f'{sum(r["wall_s"] for r in sel) / 60:.1f} min |')
    lines.append(f'| all | | {len(rows)} | | {total / 60:.1f} min |')
    return '\n'.join(lines)


def render_tables(rows: list[dict]) -> dict[str, str]:
    """The generated blocks of the page, by name."""
    shapes = sorted({r['shape'] for r in rows if r['group'] == 'main'})
    tables = {f'main-{shape}': table_main(rows, shape) for shape in shapes}
    tables.update({'reparam': table_reparam(rows), 'lr': table_lr(rows), 'd_over_u': table_d_over_u(rows),
                   'wall': table_wall(rows)})
    return tables


_BLOCK = re.compile(r'(<!-- BEGIN GENERATED ([\w-]+) -->\n).*?(<!-- END GENERATED \2 -->)', re.S)


def render_page(page: Path, rows: list[dict], out_dir: Optional[Path] = None) -> list[str]:
    """Replace each ``<!-- BEGIN GENERATED name -->`` block of ``page``; returns the names filled."""
    tables = render_tables(rows)
    if out_dir is not None and list((out_dir / 'figures').glob(f'*/{NORMS_JSON}')):
        tables['norms'] = table_norms(out_dir)
    filled = []

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in tables:
            return m.group(0)
        filled.append(name)
        return f'{m.group(1)}{tables[name]}\n{m.group(3)}'

    page.write_text(_BLOCK.sub(fill, page.read_text()))
    return filled


# ------------------------------------------------------------------------------ figures


def _curves(out_dir: Path, names: Sequence[str]) -> list[list[float]]:
    curves = []
    for name in names:
        path = out_dir / 'curves' / f'{name}.json'
        if path.is_file():
            curves.append([float('nan') if x is None else x for x in json.loads(path.read_text())['loss']])
    return curves


NORMS_JSON = 'last_layer_norms.json'


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


def table_norms(out_dir: Path) -> str:
    """From the ``last_layer_norms.json`` files that :func:`plot_figures` writes."""
    lines = ['| shape | method | ‖W_d‖ first → last | change | ‖W_u‖ first → last | change |',
             '|---|---|---|---|---|---|']
    for path in sorted((out_dir / 'figures').glob(f'*/{NORMS_JSON}')):
        for r in json.loads(path.read_text()):
            cells = []
            for role in ('d', 'u'):
                v = r[role]
                cells.append(f'{v["first"]:.3f} → {v["last"]:.3f} (steps {v["first_step"]}-{v["last_step"]}) | '
                             f'{100 * (v["last"] / v["first"] - 1):+.0f}%')
            lines.append(f'| {r["shape"]} (layer {r["layer"]}) | {r["label"]} | {" | ".join(cells)} |')
    return '\n'.join(lines)


def plot_figures(out_dir: Path, rows: list[dict]) -> list[str]:
    """Loss curves per shape, the lr sweep, and ``wesar-plot``'s update-ratio pictures per shape."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    from wesar_composer import plotting

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
            tokens = np.arange(1, n + 1) * sel[0]['batch'] * (sel[0]['tokens'] // max(sel[0]['batch'] * sel[0]['steps'], 1))
            mean = np.nanmean(arr, axis=0)
            ax.plot(tokens, mean, label=f'{METHODS[method][0]} ({len(curves)} seeds)', color=f'C{i}', lw=1.2)
            if len(curves) > 1:
                ax.fill_between(tokens, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=f'C{i}', alpha=0.15)
        first = _select(rows, group='main', shape=shape)[0]
        d, n_layers = first['d_model'], first['n_layers']
        ax.set(xlabel='training tokens', ylabel='training loss', title=f'{shape}: d {d}, {n_layers} layers (mean; band: min-max over seeds)')
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
                        ax.annotate(f'{spikes} spike(s)' + (f', {div} diverged' if div else '') + f' in {len(at)} runs',
                                    (lr, mean if math.isfinite(mean) else ax.get_ylim()[1]), fontsize=7, color=f'C{i}',
                                    xytext=(-110, -4), textcoords='offset points')
            ax.set(xscale='log', xlabel='peak learning rate', ylabel='validation loss', title=f'lr sweep, {shape}')
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / 'lr_sweep.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``wesar-experiments``."""
    parser = argparse.ArgumentParser(prog='wesar-experiments', description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='runs/reproduction', help='results folder (default runs/reproduction)')
    parser.add_argument('--quick', action='store_true', help='tiny models, a few steps, one seed: minutes')
    parser.add_argument('--groups', nargs='+', default=['main', 'reparam', 'lr'], choices=['main', 'reparam', 'lr'])
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time, one torch thread each when > 1')
    parser.add_argument('--steps', type=int, default=None, help='rapid steps (stable: a quarter)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None)
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--deadline-min', type=float, default=None, help='start no run after this many minutes')
    parser.add_argument('--page', default=None, help='results page whose generated blocks to refresh')
    parser.add_argument('--render', metavar='OUT', default=None,
                        help='only redraw the figures and refresh --page from OUT/results.csv')
    parser.add_argument('--no-figures', action='store_true')
    args = parser.parse_args(argv)
    if args.page and not Path(args.page).is_file():  # checked before any run or figure
        print(f'wesar-experiments: error: --page {args.page!r} does not exist; it must be a results page with '
              '<!-- BEGIN GENERATED name --> ... <!-- END GENERATED name --> blocks (e.g. docs/reproduction.md).',
              file=sys.stderr)
        return 2

    if args.render:
        out_dir = Path(args.render)
        rows = read_results(out_dir / RESULTS_CSV)
        if not rows:
            print(f'wesar-experiments: error: no results in {out_dir / RESULTS_CSV}', file=sys.stderr)
            return 2
    else:
        scale, shapes = (QUICK, QUICK_SHAPES) if args.quick else (FULL, SHAPES)
        changes = {}
        if args.steps:
            changes['steps'] = args.steps
        if args.seeds:
            changes['seeds'] = tuple(args.seeds)
        if changes:
            from dataclasses import replace
            scale = replace(scale, **changes)
        out_dir = Path(args.out)
        start = time.perf_counter()
        rows = run_grid(out_dir, scale, shapes, args.groups, args.jobs, args.data_dir,
                        args.deadline_min * 60 if args.deadline_min else None)
        _say(f'grid done in {(time.perf_counter() - start) / 60:.1f} min, {len(rows)} runs in {out_dir / RESULTS_CSV}')
    if not args.no_figures:
        for path in plot_figures(out_dir, rows):
            _say(f'figure: {path}')
    if args.page:
        filled = render_page(Path(args.page), rows, out_dir)
        _say(f'{args.page}: refreshed {filled}')
    tables = render_tables(rows)
    for name, table in tables.items():
        print(f'\n## {name}\n\n{table}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
