"""The results page of ``wesar-experiments``: every generated table by name, and the page's blocks refreshed.

Above :mod:`~.tables`, :mod:`~.study` and :mod:`~.ablation`, which know nothing of each other's
tables: this module gathers them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from wesar_composer.tools.experiments.ablation import render_ablation_tables
from wesar_composer.tools.experiments.study import render_study_tables
from wesar_composer.tools.experiments.tables import NORMS_JSON, render_group_tables, table_norms

__all__ = ['render_tables', 'render_page']


def render_tables(rows: list[dict]) -> dict[str, str]:
    """The generated blocks of the page, by name: those of the groups ``rows`` hold (a results file
    of the study alone leaves the other blocks of the page as they are)."""
    tables = render_group_tables(rows)
    groups = {r['group'] for r in rows}
    if 'study' in groups:
        tables.update(render_study_tables(rows))
    if 'ablation' in groups:
        tables.update(render_ablation_tables(rows))
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
