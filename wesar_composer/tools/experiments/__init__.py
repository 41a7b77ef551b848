"""The reproduction (``wesar-experiments``): the paper's claims tested at CPU scale through llm-foundry.

Every run is the demo YAML (``wesar-demo --write-yaml``) trained by llm-foundry's own train path
(:func:`wesar_composer.tools.demo.train_one`), with the method's algorithms taken from the paper
recipes' method parts (package data ``wesar_composer/tools/yamls/method/*.yaml``) and the setting
(rapid / stable) scaled down:

- ``main``: Small init (rapid), Small init (stable), He init, WeSaR, WeSaR with the Small
  backbone, WeSaR with fixed gates; several seeds; two model shapes (``base`` and the deep,
  narrow ``deep``) (Tables 5 and 7 in miniature);
- ``reparam``: Weight Normalization, sigma-Reparam (pre-LN), residual scaling (He and Small)
  beside Small init and WeSaR (Table 6 in miniature);
- ``lr``: the learning rate swept upward for Small init and WeSaR, loss spikes and divergences
  counted by ``loss_spike_counter`` (the stress test standing in for the 13B spikes);
- ``study`` (not in the default groups): each arm at its own best learning rate, over three
  depths and two widths: Small init, WeSaR with width-scaled sigma, the literal sigma^2 = 4e-5,
  per-matrix learning rates without gates, Small init with W_o / W_d at lr / sqrt(2N), and
  qk-LayerNorm as a positive control (``docs/reproduction.md`` states its decision rule);
- ``ablation`` (not in the default groups): seven arms on one grid of lr / sigma at d 64 with
  N = 4, 8, 16 (Small init, WeSaR, WeSaR with fixed gates, the gate-free twin, the twin with a
  matched clipping threshold, Small init with W_o / W_d at lr / sqrt(2N), WeSaR on the Small
  backbone), three seeds near each optimum, analysed by paired differences and an equivalence test
  (``--dry-run`` lists its runs and their expected time).

Runs of Small init and WeSaR with the first seed log ``update_ratio_monitor`` to a local MLflow
store; ``wesar-plot``'s functions draw Figure 1 / 3 and the heatmap from it. Every finished run
appends one row to ``results.csv`` and writes its loss curve to ``curves/{run}.json`` (a rerun skips the
finished ones), then the figures are drawn and the generated tables of the results page are
refreshed.

    wesar-experiments --quick --out /tmp/repro            # a few minutes: the pipeline end to end
    wesar-experiments --out runs/reproduction --jobs 2    # the full grid: 96 runs, under an hour on 2 cores
    wesar-experiments --render docs/reproduction --page docs/reproduction.md   # figures and page tables only

Modules: :mod:`~.grid` (the grid of runs and their configs), :mod:`~.run` (running them, the
process pool), :mod:`~.tables` (``results.csv`` and the earlier groups' tables), :mod:`~.measures`
(paired differences, equivalence test, basins), :mod:`~.study` (the study's measures and decision
rule), :mod:`~.ablation` (the ablation's), :mod:`~.page` (every table, the page refreshed),
:mod:`~.figures` (figures), :mod:`~.cli` (the console entry).
"""

from wesar_composer.tools.experiments.cli import main
from wesar_composer.tools.experiments.figures import plot_figures
from wesar_composer.tools.experiments.grid import (
    FIGURE_METHODS,
    FULL,
    LR_METHODS,
    MAIN_METHODS,
    METHODS,
    QUICK,
    QUICK_SHAPES,
    REPARAM_METHODS,
    SETTINGS,
    SHAPES,
    STUDY_ARMS,
    STUDY_LRS,
    RunSpec,
    Scale,
    build_config,
    plan,
    run_settings,
)
from wesar_composer.tools.experiments.page import render_page, render_tables
from wesar_composer.tools.experiments.run import diverged, max_attention_logit, run_grid, run_one
from wesar_composer.tools.experiments.study import decisions, paired_twin, plot_study, summarize
from wesar_composer.tools.experiments.tables import RESULTS_CSV, Row, read_results, table_norms

__all__ = [
    'METHODS',
    'MAIN_METHODS',
    'REPARAM_METHODS',
    'LR_METHODS',
    'FIGURE_METHODS',
    'STUDY_ARMS',
    'STUDY_LRS',
    'SHAPES',
    'QUICK_SHAPES',
    'SETTINGS',
    'Scale',
    'FULL',
    'QUICK',
    'RunSpec',
    'Row',
    'RESULTS_CSV',
    'plan',
    'run_settings',
    'build_config',
    'diverged',
    'run_one',
    'run_grid',
    'read_results',
    'render_tables',
    'render_page',
    'table_norms',
    'plot_figures',
    'max_attention_logit',
    'summarize',
    'decisions',
    'paired_twin',
    'plot_study',
    'main',
]
