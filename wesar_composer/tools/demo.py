"""The demo (``wesar-demo``, ``make demo``): Small-init baseline vs WeSaR on a small MPT, on CPU.

1. builds the offline dataset (``wesar-data``; cached after the first run);
2. trains the demo YAML (packaged; ``--yaml`` for your own) twice through llm-foundry's own train path
   (``llmfoundry.command_utils.train``), ``variables.method=small_init`` then ``wesar``: same
   data, seed and batches, logging to a local MLflow store;
3. writes ``report.md`` (validation loss and perplexity, loss spikes, the d/u update-ratio gap,
   wall time) and the PNGs of ``wesar-plot`` into the output folder.

    wesar-demo                               # about 10 minutes on 2 CPU cores
    wesar-demo --out runs/demo --set max_duration=100ba
    wesar-demo --write-yaml demo.yaml        # the packaged YAML, to edit
    wesar-demo --yaml demo.yaml              # the demo on your own YAML

Every path is relative to the current folder: the output (``runs/demo``), the dataset
(``data/shakespeare-v{vocab}-s{seq_len}``) and the YAML's own ``./data`` and ``./runs`` folders.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union, cast

from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger

from wesar_composer.callbacks import LossSpikeCounter

__all__ = [
    'RunResult',
    'DemoProgress',
    'demo_yaml',
    'find_demo_yaml',
    'load_config',
    'run_demo',
    'write_report',
    'write_demo_yaml',
    'main',
]

METHODS = ('small_init', 'wesar')
METHOD_LABELS = {'small_init': 'Small init (baseline)', 'wesar': 'WeSaR'}
DEFAULT_OUT = 'runs/demo'
DEMO_YAML = 'yamls/demo.yaml'  # package data of wesar_composer.tools
PROGRESS_CALLBACK = 'wesar_demo_progress'
PROGRESS_INTERVAL = 10  # batches between progress lines


DEFAULT_TAG = 'wesar-demo'  # the [tag] of progress lines; wesar-experiments passes its own
_console = None  # where progress goes while llm-foundry's own output is sent to a log file


def _say(line: str, tag: str = DEFAULT_TAG) -> None:
    print(f'[{tag}] {line}', file=_console or sys.stdout, flush=True)


# Messages every llm-foundry MPT run prints that say nothing about the run, dropped by logger and text:
# MPT generates (an exported model is tested with generate) though it does not inherit GenerationMixin,
# and llm-foundry's hf RoPE config carries a `factor` that the default RoPE type ignores.
KNOWN_NOISE = {
    'transformers.modeling_utils': "doesn't directly inherit from `GenerationMixin`",
    'transformers.modeling_rope_utils': 'Unrecognized keys in `rope_scaling`',
}


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains ``fragment``."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters of :data:`KNOWN_NOISE` (once per process)."""
    for name, fragment in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))


def _console_handlers() -> list[logging.StreamHandler]:
    """Logging handlers that write to the console (transformers binds its own to stderr at import)."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ('transformers', 'composer', 'llmfoundry')]
    consoles = {id(sys.__stderr__), id(sys.__stdout__), id(sys.stderr), id(sys.stdout)}
    return [
        h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and id(getattr(h, 'stream', None)) in consoles
    ]


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send stdout, stderr and the console logging handlers to ``log_path``; ``_say`` keeps writing to the console."""
    global _console
    saved = _console
    with open(log_path, 'w') as log_file:
        _console = saved or sys.stdout
        handlers = _console_handlers()
        streams = [h.setStream(log_file) for h in handlers]
        try:
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            _console = saved


def demo_yaml():
    """The packaged demo YAML: a readable resource (``.open()``, ``.read_text()``), from a wheel or a checkout."""
    return resources.files('wesar_composer.tools').joinpath(DEMO_YAML)


def find_demo_yaml(path: Optional[Union[str, os.PathLike]] = None):
    """``path`` (a file of yours, relative to the current folder), else the packaged demo YAML."""
    if path is None:
        return demo_yaml()
    candidate = Path(path)
    if not candidate.is_file():
        raise FileNotFoundError(
            f'Demo YAML not found: {str(candidate)!r} (from {os.getcwd()}). Leave --yaml out for the packaged one, '
            'or write it out to edit with `wesar-demo --write-yaml demo.yaml`.',
        )
    return candidate


def write_demo_yaml(path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Write the packaged demo YAML to ``path`` (relative to the current folder) for editing.

    An existing file is kept unless ``overwrite``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f'{str(target)!r} exists; not overwritten (remove it, or pass --force).')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(demo_yaml().read_text())
    return target


# ------------------------------------------------------------------------------ progress


class DemoProgress(Callback):
    """One line every ``interval`` batches and after each evaluation: loss, lr, spikes, time left.

    Lines read ``[tag] label: batch 10/300 loss ...`` on the console.
    """

    def __init__(self, label: str = '', interval: int = PROGRESS_INTERVAL, tag: str = DEFAULT_TAG):
        self.label = label
        self.interval = interval
        self.tag = tag
        self._start: Optional[float] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch.value
        max_duration = state.max_duration
        total = max_duration.value if max_duration is not None and max_duration.unit == TimeUnit.BATCH else None
        if batch % self.interval != 0 and batch != total:
            return
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        per_batch = elapsed / max(batch, 1)
        loss = state.total_loss_dict.get('loss/train/total')
        lr = state.optimizers[0].param_groups[0]['lr'] if state.optimizers else float('nan')
        spikes = _spike_count(state.callbacks)
        _say(
            f'{self.label}: batch {batch}/{total or "?"}'
            + (f' loss {float(loss):.3f}' if loss is not None else '')
            + f' lr {lr:.2e}'
            + (f' spikes {spikes}' if spikes is not None else '')
            + f' ({per_batch:.2f} s/batch'
            + (f', {per_batch * (total - batch) / 60:.1f} min left)' if total else ')'),
            self.tag,
        )

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get('eval', {})
        if 'LanguageCrossEntropy' in metrics:
            ce = float(metrics['LanguageCrossEntropy'].compute())
            _say(
                f'{self.label}: eval at batch {state.timestamp.batch.value}: '
                f'loss {ce:.3f}, perplexity {math.exp(ce):.1f}',
                self.tag,
            )


def _spike_count(callbacks: Sequence[Callback]) -> Optional[int]:
    return next((c.count for c in callbacks if isinstance(c, LossSpikeCounter)), None)


def _register_progress_callback() -> None:
    from llmfoundry import registry

    if PROGRESS_CALLBACK not in registry.callbacks:
        registry.callbacks.register(PROGRESS_CALLBACK, func=DemoProgress)


# ------------------------------------------------------------------------------ runs


@dataclass
class RunResult:
    """What the report needs from one run."""

    method: str
    run_name: str
    run_id: Optional[str]
    val_loss: float
    val_perplexity: float
    spikes: Optional[int]
    wall_seconds: float
    batches: int
    tokens: int
    d_over_u: Optional[float] = None  # median over logged steps of ratio_d / ratio_u, mean over layers
    d_over_u_last: Optional[float] = None  # the same, last layer only
    n_params: int = 0  # gates aside


def load_config(yaml_path=None, overrides: Sequence[str] = ()):
    """The YAML (a path, a packaged resource, or None for the packaged demo YAML) with ``overrides``.

    llm-foundry reads relative ``code_paths`` from the current folder; one missing there but
    present beside a YAML file of yours is taken from beside the YAML.
    """
    from omegaconf import OmegaConf as om

    source = demo_yaml() if yaml_path is None else yaml_path
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
    with source.open('r') as f:
        cfg = om.load(f)
    if overrides:
        cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    if cfg.get('code_paths') and isinstance(source, Path):
        here = source.resolve().parent
        cfg.code_paths = [
            p if Path(p).is_absolute() or Path(p).exists() or not (here / p).is_file() else str(here / p)
            for p in cfg.code_paths
        ]
    return cfg


def yaml_label(yaml_path) -> str:
    """How the report names the YAML: the user's path, or the packaged one."""
    if yaml_path is None or yaml_path == demo_yaml():
        return 'the packaged demo YAML, `wesar-demo --write-yaml demo.yaml`'
    return f'`{yaml_path}`'


def _mlflow_run_id(trainer) -> Optional[str]:
    for destination in trainer.logger.destinations:
        if type(destination).__name__ == 'MLFlowLogger':
            return getattr(destination, '_run_id', None)
    return None


def _result(trainer, method: str, wall: float) -> RunResult:
    metrics = trainer.state.eval_metrics.get('eval', {})
    if 'LanguageCrossEntropy' not in metrics:
        raise RuntimeError(f'The {method} run has no eval metrics; is eval_loader set in the demo YAML?')
    val_loss = float(metrics['LanguageCrossEntropy'].compute())
    return RunResult(
        method=method,
        run_name=str(trainer.state.run_name),
        run_id=_mlflow_run_id(trainer),
        val_loss=val_loss,
        val_perplexity=math.exp(val_loss),
        spikes=_spike_count(trainer.state.callbacks),
        wall_seconds=wall,
        batches=trainer.state.timestamp.batch.value,
        tokens=trainer.state.timestamp.token.value,
        n_params=sum(p.numel() for name, p in trainer.state.model.named_parameters() if not name.endswith('gate')),
    )


def train_one(
    cfg, method: str, log_path: Optional[Path] = None, tag: str = DEFAULT_TAG, label: Optional[str] = None
) -> RunResult:
    """Train one method through llm-foundry's train path and collect its results.

    llm-foundry's console output (the resolved config, warnings) goes to ``log_path`` if given;
    the progress lines of :class:`DemoProgress` stay on the console, as ``[tag] label: ...``
    (label: the method by default).
    """
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf as om

    quiet_known_noise()
    cfg = om.merge(
        cfg,
        om.create(
            {
                'variables': {'method': method},
                'progress_bar': False,
                'callbacks': {PROGRESS_CALLBACK: {'label': label or method, 'tag': tag}},
            }
        ),
    )
    start = time.perf_counter()
    with _output_to(log_path) if log_path is not None else contextlib.nullcontext():
        trainer = train(cfg)
        wall = time.perf_counter() - start
        try:
            result = _result(trainer, method, wall)
        finally:
            trainer.close()  # ends the MLflow run and flushes its metrics
    return result


def update_ratio_gap(tracking_uri: str, run_id: str) -> tuple[Optional[float], Optional[float]]:
    """(mean over layers, last layer) of the median over logged steps of ratio(W_d) / ratio(W_u)."""
    import re

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(r'^update_ratio/L(\d+)/d$', k))})
    per_layer = []
    for layer in layers:
        d = {m.step: m.value for m in client.get_metric_history(run_id, f'update_ratio/L{layer}/d')}
        u = {m.step: m.value for m in client.get_metric_history(run_id, f'update_ratio/L{layer}/u')}
        ratios = [d[s] / u[s] for s in sorted(d.keys() & u.keys()) if u[s] > 0]
        if ratios:
            per_layer.append(statistics.median(ratios))
    if not per_layer:
        return None, None
    return statistics.fmean(per_layer), per_layer[-1]


# ------------------------------------------------------------------------------ report


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def _evaluated(data_summary: dict[str, Any]) -> str:
    """What the validation loss was computed on: the whole split, or the batches evaluation was limited to."""
    total = data_summary['val_tokens']
    evaluated = data_summary.get('eval_tokens', total)
    if evaluated >= total:
        return f'the whole validation split ({total:,} tokens)'
    batches = data_summary['eval_batches']
    return (
        f'the first {"batch" if batches == 1 else f"{batches} batches"} of {data_summary["eval_batch_size"]} '
        f"validation sequences, {evaluated:,} of the split's {total:,} tokens "
        f'(eval_subset_num_batches: {batches})'
    )


def write_report(
    results: list[RunResult],
    out_dir: Path,
    pictures: Sequence[str],
    cfg_summary: dict[str, Any],
    data_summary: dict[str, Any],
) -> Path:
    """``report.md`` in ``out_dir``: the table, how it was measured, the pictures."""
    lines = [
        '# WeSaR demo: Small-init baseline vs WeSaR',
        '',
        f'Small MPT (d {cfg_summary["d_model"]}, {cfg_summary["n_layers"]} layers, '
        f'{cfg_summary["n_params"]} parameters), trained on CPU through llm-foundry, '
        f'{cfg_summary["batches"]} batches of {cfg_summary["batch_tokens"]:,} tokens, '
        f'lr {cfg_summary["lr"]:g} (the rapid recipe scaled down; {cfg_summary.get("yaml", "the demo YAML")}). '
        f'Data: {data_summary["train_tokens"]:,} training tokens of Project Gutenberg Shakespeare and '
        f'Milton; the validation split holds {data_summary["val_tokens"]:,} tokens of held-out works.',
        '',
        '| run | val loss | val perplexity | loss spikes | d/u update-ratio gap (all layers / last) | wall time |',
        '|---|---|---|---|---|---|',
    ]
    for r in results:
        lines.append(
            f'| {METHOD_LABELS.get(r.method, r.method)} | {r.val_loss:.3f} | {r.val_perplexity:.1f} | '
            f'{r.spikes if r.spikes is not None else "-"} | {_fmt(r.d_over_u, ".2f")} / {_fmt(r.d_over_u_last, ".2f")} | '
            f'{r.wall_seconds / 60:.1f} min |',
        )
    lines += [
        '',
        f'- val loss: cross entropy (nats/token) on {_evaluated(data_summary)} after the last step; '
        'perplexity = exp(loss).',
        '- loss spikes: `loss_spike_counter` (a batch whose loss is >= 1.5x the mean of the recent '
        'non-spike losses starts a spike).',
        '- d/u gap: ||dW_d||/||W_d|| divided by ||dW_u||/||W_u|| (`update_ratio_monitor`), median '
        'over the logged steps, averaged over layers / in the last layer. The paper (Figure 1) finds '
        'W_d updated far faster than W_u under Small init and the two comparable under WeSaR.',
        '- wall time: the whole llm-foundry run (model build, training, evaluations), on this machine.',
        '- one learning rate for both: with Adam each matrix moves by about lr / (its std) per step, and '
        "WeSaR's actual weights are several times smaller than Small init's here, so this table compares "
        "step sizes as much as methods. At each method's own best learning rate (docs/reproduction.md in "
        'the wesar-composer repository) WeSaR and Small init reached the same loss, a model without gates but '
        "with WeSaR's per-matrix learning rates did as well, and Small init with only W_o and W_d at "
        'lr / sqrt(2N) did better, by more with depth; see docs/choosing-sigma-and-lr.md for setting sigma and '
        'the learning rate.',
        '',
    ]
    for picture in pictures:
        name = os.path.basename(picture)
        lines += [f'![{name}]({name})', '']
    path = out_dir / 'report.md'
    path.write_text('\n'.join(lines))
    return path


# ------------------------------------------------------------------------------ main


def run_demo(
    out_dir: Path,
    yaml_path=None,
    overrides: Sequence[str] = (),
    data_dir: Optional[str] = None,
    max_chars: Optional[int] = None,
    methods: Sequence[str] = METHODS,
) -> tuple[Path, list[RunResult]]:
    """Build the data, train each method, write the report and pictures.

    ``yaml_path``: a YAML file of yours, or None (or :func:`demo_yaml`) for the packaged one.
    Relative paths (``out_dir``, ``data_dir``, the YAML's own) are from the current folder.
    Returns the report's path and one :class:`RunResult` per method.
    """
    from wesar_composer.tools.data import build_dataset, default_output_dir

    total_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = str((out_dir / 'mlruns').resolve())
    cfg = load_config(yaml_path, overrides)
    vocab_size = int(cfg.variables.vocab_size)
    seq_len = int(cfg.variables.max_seq_len)

    _say(f'data: building or reusing the offline dataset (vocab {vocab_size}, {seq_len}-token samples)')
    data = build_dataset(
        data_dir or default_output_dir(vocab_size, seq_len, max_chars),
        vocab_size=vocab_size,
        seq_len=seq_len,
        max_chars=max_chars,
        progress=lambda line: _say(f'data: {line}'),
    )
    from omegaconf import OmegaConf as om

    cfg = om.merge(
        cfg,
        om.create(
            {
                'variables': {
                    'data_root': str(data.root.resolve()),
                    'mlflow_tracking_uri': tracking_uri,
                }
            }
        ),
    )
    _register_progress_callback()

    results = []
    for method in methods:
        _say(f'training {METHOD_LABELS.get(method, method)} ({method}): {cfg.max_duration} on CPU ...')
        log_path = out_dir / f'{method}.log'
        _say(f'{method}: llm-foundry output in {log_path}')
        result = train_one(cfg, method, log_path)
        if result.run_id is not None:
            result.d_over_u, result.d_over_u_last = update_ratio_gap(tracking_uri, result.run_id)
        _say(
            f'{method}: val loss {result.val_loss:.3f} (perplexity {result.val_perplexity:.1f}), '
            f'spikes {result.spikes}, d/u gap {_fmt(result.d_over_u, ".2f")}, '
            f'{result.wall_seconds / 60:.1f} min',
        )
        results.append(result)

    pictures: list[str] = []
    run_ids = [r.run_id for r in results if r.run_id is not None]
    if run_ids:
        from wesar_composer.tools import plotting

        runs = plotting.load_runs(tracking_uri, run_ids)
        try:
            pictures = plotting.plot_runs(runs, str(out_dir))
        except KeyError as err:  # e.g. a run shorter than the monitor's log_interval
            _say(f'pictures left out: {err.args[0]}')

    resolved = cast(dict[str, Any], om.to_container(cfg, resolve=True))
    cfg_summary = {
        'd_model': resolved['model']['d_model'],
        'n_layers': resolved['model']['n_layers'],
        'n_params': f'{results[0].n_params / 1e6:.2f}M' if results else '?',
        'batches': results[0].batches if results else 0,
        'batch_tokens': resolved['global_train_batch_size'] * resolved['max_seq_len'],
        'lr': resolved['optimizer']['lr'],
        'yaml': yaml_label(yaml_path),
    }
    eval_batches, eval_batch_size = resolved.get('eval_subset_num_batches', -1), resolved['device_eval_batch_size']
    val_samples = data.manifest['stats']['val']['mds_samples']
    evaluated = val_samples if eval_batches < 0 else min(val_samples, eval_batches * eval_batch_size)
    data_summary = {
        'train_tokens': data.tokens['train'],
        'val_tokens': data.tokens['val'],
        'eval_tokens': evaluated * data.seq_len,
        'eval_batches': eval_batches,
        'eval_batch_size': eval_batch_size,
    }
    report = write_report(results, out_dir, pictures, cfg_summary, data_summary)
    _say(f'done in {(time.perf_counter() - total_start) / 60:.1f} min: {report}')
    for picture in pictures:
        _say(f'picture: {picture}')
    return report, results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``wesar-demo``."""
    parser = argparse.ArgumentParser(
        prog='wesar-demo',
        description='Train the Small-init baseline and WeSaR on a small MPT on CPU through llm-foundry, '
        'then write a report and the update-ratio pictures.',
    )
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'output folder (default {DEFAULT_OUT})')
    parser.add_argument('--yaml', default=None, help='your own demo YAML (default: the packaged one; see --write-yaml)')
    parser.add_argument(
        '--write-yaml', metavar='PATH', default=None, help='write the packaged demo YAML to PATH for editing, then stop'
    )
    parser.add_argument('--force', action='store_true', help='with --write-yaml: overwrite an existing file')
    parser.add_argument(
        '--data-dir',
        default=None,
        help='dataset folder (default data/shakespeare-v{vocab}-s{seq_len}, built if missing)',
    )
    parser.add_argument('--max-chars', type=int, default=None, help='cap on the corpus size, for quick runs')
    parser.add_argument(
        '--methods',
        nargs='+',
        default=list(METHODS),
        choices=METHODS,
        help='runs to make, in order (default: small_init wesar)',
    )
    parser.add_argument(
        '--set',
        nargs='*',
        default=[],
        metavar='KEY=VALUE',
        help='overrides of the demo YAML for both runs, e.g. max_duration=100ba model.n_layers=2',
    )
    args = parser.parse_args(argv)
    if args.write_yaml:
        try:
            written = write_demo_yaml(args.write_yaml, overwrite=args.force)
        except FileExistsError as e:
            print(f'wesar-demo: error: {e}', file=sys.stderr)
            return 2
        print(
            f'wrote {written}: run it with `wesar-demo --yaml {written}` or '
            f'`composer -n 1 -m llmfoundry.cli.cli train {written}` (after `wesar-data`)'
        )
        return 0
    try:
        yaml_path = find_demo_yaml(args.yaml) if args.yaml else None
        report, _ = run_demo(Path(args.out), yaml_path, args.set, args.data_dir, args.max_chars, args.methods)
    except Exception as e:  # noqa: BLE001 - one readable line, then the traceback for details
        from wesar_composer.tools.data import CorpusSourceError, DatasetExistsError

        if isinstance(e, (FileNotFoundError, CorpusSourceError, DatasetExistsError)):
            print(f'wesar-demo: error: {e}', file=sys.stderr)
            return 2
        raise
    print()
    print(report.read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
