"""The study of ``wesar-experiments --groups study``: each arm at its own best learning rate.

From ``results.csv`` rows of group ``study``: per shape and arm the best learning rate and its
validation loss, the LR sensitivity of Wortsman et al. (2023), the basin width, spikes, the d/u
gap and the largest attention logit; the differences against Small init with their standard
errors; the decision rule of ``docs/reproduction.md`` applied to them; and the picture of loss
against lr / sigma. With rows of group ``refine`` (``--groups refine``): each compared arm near
its optimum, with the seed noise there, and rules 1(a), 2 and 3 applied again to those.

Modules: :mod:`~.arms` (the first pass and its decision rule), :mod:`~.refine` (the refinement,
the paired comparisons, the interpolated basins), :mod:`~.figure` (the figure); this one gathers
their tables.
"""

from __future__ import annotations

from wesar_composer.tools.experiments.study.arms import (
    OD_VERDICT,
    ArmSummary,
    decisions,
    pooled_variance,
    summarize,
    table_arms,
    table_sweep,
    table_vs_small,
)
from wesar_composer.tools.experiments.study.figure import plot_study
from wesar_composer.tools.experiments.study.refine import (
    best_lrs,
    interpolated_basins,
    paired_twin,
    refined_decisions,
    summarize_refined,
    table_basins,
    table_paired,
    table_refined,
)

__all__ = [
    'ArmSummary',
    'OD_VERDICT',
    'summarize',
    'pooled_variance',
    'decisions',
    'best_lrs',
    'summarize_refined',
    'refined_decisions',
    'paired_twin',
    'interpolated_basins',
    'render_study_tables',
    'plot_study',
]


def render_study_tables(rows: list[dict]) -> dict[str, str]:
    summary = summarize(rows)
    if not summary:
        return {}
    tables = {
        'study-arms': table_arms(summary),
        'study-sweep': table_sweep(summary),
        'study-vs-small': table_vs_small(summary),
        'study-decision': '\n'.join(decisions(summary)),
    }
    refined = summarize_refined(rows, summary)
    if refined:
        tables['study-refined'] = table_refined(refined)
        tables['study-refined-decision'] = '\n'.join(refined_decisions(refined))
        pairs = paired_twin(rows, refined)
        if pairs is not None:
            tables['study-paired'] = table_paired(pairs)
    basins = interpolated_basins(rows)
    if basins:
        tables['study-basins'] = table_basins(basins)
    return tables
