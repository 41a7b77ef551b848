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

This module is the command and its sequence; the parts live beside it: ``demo_yaml`` (the
packaged YAML), ``console`` (progress lines, log files, known noise), ``progress`` (the progress
callback), ``training`` (one run through llm-foundry), ``mlflow_reads`` and ``report``. Its
imports are light: ``--write-yaml`` and ``--help`` import no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

from wesar_composer.tools.console import say
from wesar_composer.tools.demo_yaml import (
    DEMO_YAML,
    demo_yaml,
    find_demo_yaml,
    load_config,
    write_demo_yaml,
    yaml_label,
)
from wesar_composer.tools.report import METHOD_LABELS, fmt, write_report

if TYPE_CHECKING:
    from wesar_composer.tools.training import RunResult

__all__ = [
    'DEMO_YAML',
    'METHODS',
    'demo_yaml',
    'find_demo_yaml',
    'load_config',
    'run_demo',
    'write_demo_yaml',
    'main',
]

METHODS = ('small_init', 'wesar')
DEFAULT_OUT = 'runs/demo'


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
    from omegaconf import OmegaConf as om

    from wesar_composer.tools.data import build_dataset, default_output_dir
    from wesar_composer.tools.mlflow_reads import update_ratio_gap
    from wesar_composer.tools.progress import register_progress_callback
    from wesar_composer.tools.training import train_one

    total_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = str((out_dir / 'mlruns').resolve())
    cfg = load_config(yaml_path, overrides)
    vocab_size = int(cfg.variables.vocab_size)
    seq_len = int(cfg.variables.max_seq_len)

    say(f'data: building or reusing the offline dataset (vocab {vocab_size}, {seq_len}-token samples)')
    data = build_dataset(
        data_dir or default_output_dir(vocab_size, seq_len, max_chars),
        vocab_size=vocab_size,
        seq_len=seq_len,
        max_chars=max_chars,
        progress=lambda line: say(f'data: {line}'),
    )
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
    register_progress_callback()

    results = []
    for method in methods:
        say(f'training {METHOD_LABELS.get(method, method)} ({method}): {cfg.max_duration} on CPU ...')
        log_path = out_dir / f'{method}.log'
        say(f'{method}: llm-foundry output in {log_path}')
        result = train_one(cfg, method, log_path)
        if result.run_id is not None:
            result.d_over_u, result.d_over_u_last = update_ratio_gap(tracking_uri, result.run_id)
        say(
            f'{method}: val loss {result.val_loss:.3f} (perplexity {result.val_perplexity:.1f}), '
            f'spikes {result.spikes}, d/u gap {fmt(result.d_over_u, ".2f")}, '
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
            say(f'pictures left out: {err.args[0]}')

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
    say(f'done in {(time.perf_counter() - total_start) / 60:.1f} min: {report}')
    for picture in pictures:
        say(f'picture: {picture}')
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
            f'`OMP_NUM_THREADS=1 composer -n 2 -m llmfoundry.cli.cli train {written}` (after `wesar-data`)'
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
