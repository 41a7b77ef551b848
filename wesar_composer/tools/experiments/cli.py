"""The console entry ``wesar-experiments`` (also ``python -m wesar_composer.tools.experiments``).

Every path it reads or writes by default is relative to the current folder: ``--out``
(``runs/reproduction``), the dataset (``data/...``, or ``--data-dir``), ``--page``; the base YAML
and the method parts come from the package unless ``--yaml`` names a file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from wesar_composer.tools.experiments.figures import plot_figures
from wesar_composer.tools.experiments.grid import FULL, QUICK, QUICK_SHAPES, SHAPES, _say, estimate_seconds, plan
from wesar_composer.tools.experiments.page import render_page, render_tables
from wesar_composer.tools.experiments.run import refine_centres, run_grid
from wesar_composer.tools.experiments.tables import RESULTS_CSV, read_results

__all__ = ['main']

_DESCRIPTION = "The paper's claims tested at CPU scale through llm-foundry, with a results page."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``wesar-experiments``."""
    parser = argparse.ArgumentParser(prog='wesar-experiments', description=_DESCRIPTION)
    parser.add_argument('--out', default='runs/reproduction', help='results folder (default runs/reproduction)')
    parser.add_argument('--quick', action='store_true', help='tiny models, a few steps, one seed: minutes')
    parser.add_argument(
        '--groups',
        nargs='+',
        default=['main', 'reparam', 'lr'],
        choices=['main', 'reparam', 'lr', 'study', 'refine', 'ablation'],
        help="refine: the study's arms of its rules 1 to 3 at learning rates between its best and the "
        'neighbours; reads the study results in --out. ablation: seven arms on one lr / sigma grid at '
        'd 64, N 4, 8, 16; a rerun adds the points its extension rule asks for',
    )
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='list the runs still to make (those not in --out/results.csv) and their expected time; run nothing',
    )
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time, one torch thread each when > 1')
    parser.add_argument('--steps', type=int, default=None, help='rapid steps (stable: a quarter)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None)
    parser.add_argument(
        '--data-dir',
        default=None,
        help='dataset folder (default data/shakespeare-v{vocab}-s{seq_len}[-c{max_chars}] in the '
        'current folder, built if missing)',
    )
    parser.add_argument(
        '--yaml',
        default=None,
        help='the base train YAML of every run (default: the packaged demo YAML; '
        '`wesar-demo --write-yaml demo.yaml` writes it out for editing)',
    )
    parser.add_argument('--deadline-min', type=float, default=None, help='start no run after this many minutes')
    parser.add_argument('--page', default=None, help='results page whose generated blocks to refresh')
    parser.add_argument(
        '--render', metavar='OUT', default=None, help='only redraw the figures and refresh --page from OUT/results.csv'
    )
    parser.add_argument('--no-figures', action='store_true')
    args = parser.parse_args(argv)
    if args.page and not Path(args.page).is_file():  # checked before any run or figure
        print(
            f'wesar-experiments: error: --page {args.page!r} does not exist; it must be a results page with '
            '<!-- BEGIN GENERATED name --> ... <!-- END GENERATED name --> blocks (e.g. docs/reproduction.md).',
            file=sys.stderr,
        )
        return 2

    if args.yaml and not Path(args.yaml).is_file():
        print(f'wesar-experiments: error: --yaml {args.yaml!r} does not exist.', file=sys.stderr)
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
        study_best = None
        if 'refine' in args.groups:  # refused before any work
            try:
                study_best = refine_centres(out_dir / RESULTS_CSV, scale)
            except ValueError as e:
                print(f'wesar-experiments: error: {e}', file=sys.stderr)
                return 2
        if args.dry_run:
            return _dry_run(out_dir, scale, shapes, args.groups, args.jobs, study_best, args.deadline_min)
        start = time.perf_counter()
        rows = run_grid(
            out_dir,
            scale,
            shapes,
            args.groups,
            args.jobs,
            args.data_dir,
            args.deadline_min * 60 if args.deadline_min else None,
            demo_yaml=args.yaml,
            study_best=study_best,
        )
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


def _dry_run(out_dir: Path, scale, shapes, groups, jobs: int, study_best, deadline_min: Optional[float]) -> int:
    """Print the runs still to make, in order, with the expected wall time of each (two at a time on a
    quiet 2-core machine), the total, and which runs a deadline would leave unstarted."""
    previous = read_results(out_dir / RESULTS_CSV)
    done = {r['run_name'] for r in previous}
    todo = [s for s in plan(scale, groups, study_best, shapes, ablation_rows=previous) if s.name not in done]
    workers = [0.0] * max(jobs, 1)
    cut = []
    for spec in todo:
        seconds = estimate_seconds(spec, scale, shapes)
        i = min(range(len(workers)), key=workers.__getitem__)
        if deadline_min is not None and workers[i] >= deadline_min * 60:
            cut.append(spec)
            continue
        print(f'{spec.name}\t{seconds:.0f} s')
        workers[i] += seconds
    total = sum(estimate_seconds(s, scale, shapes) for s in todo)
    print(
        f'{len(todo)} runs to make ({len(done)} already in {out_dir / RESULTS_CSV}): {total / 60:.0f} min of runs, '
        f'about {max(workers) / 60:.0f} min with --jobs {jobs} on a quiet machine (a loaded one: 2 to 3 times that)'
    )
    if cut:
        print(
            f'--deadline-min {deadline_min:g} would leave {len(cut)} runs unstarted: ' + ', '.join(s.name for s in cut)
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
