"""The grid of runs of ``wesar-experiments``: methods, shapes, scales, the plan, and each run's config.

One module: the plan and the configs read the same method table, learning-rate grids and scales,
and a change to a group's runs is made to all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, cast

__all__ = [
    'METHODS',
    'MAIN_METHODS',
    'REPARAM_METHODS',
    'LR_METHODS',
    'FIGURE_METHODS',
    'STUDY_ARMS',
    'STUDY_LRS',
    'REFINE_ARMS',
    'refine_lrs',
    'ABLATION_ARMS',
    'ABLATION_SHAPES',
    'ABLATION_GRID',
    'ABLATION_OPTIMUM',
    'ABLATION_SEEDS',
    'MATCHED_CLIPPING',
    'ablation_lr',
    'ablation_points',
    'ablation_extension',
    'ablation_k',
    'arm_sigma',
    'estimate_seconds',
    'study_sigma_squared',
    'SHAPES',
    'QUICK_SHAPES',
    'SETTINGS',
    'Scale',
    'FULL',
    'QUICK',
    'RunSpec',
    'plan',
    'run_settings',
    'method_part',
    'build_config',
]

METHOD_PARTS = 'yamls/method'  # package data of wesar_composer.tools: the paper recipes' method parts
RECORDER_CALLBACK = 'wesar_experiment_recorder'
MLFLOW_EXPERIMENT = 'wesar-reproduction'

# method key -> (label, method part in METHOD_PARTS, setting)
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
    # the study (docs/reproduction.md): arms whose algorithms depend on the width, built by _study_algorithms
    'wesar_width': ('WeSaR, sigma^2 = 0.081/d', '', 'rapid'),
    'matrix_lr': ('He init, lr x s_r/sigma (no gates)', '', 'rapid'),
    'small_od_lr': ('Small init, W_o/W_d lr / sqrt(2N)', '', 'rapid'),
    'small_qkln': ('Small init + qk-LayerNorm', 'small_init', 'rapid'),
    # the ablation (docs/reproduction.md): the gates, the clipping and the backbone separated
    'wesar_width_fixed': ('WeSaR, sigma^2 = 0.081/d, fixed gates', '', 'rapid'),
    'matrix_lr_clip': ('He init, lr x s_r/sigma (no gates), clipping x sigma/s_r', '', 'rapid'),
    'wesar_width_small': ('WeSaR, sigma^2 = 0.081/d, Small backbone', '', 'rapid'),
}
MAIN_METHODS = ('small_rapid', 'small_stable', 'he', 'wesar', 'wesar_small', 'wesar_fixed')
REPARAM_METHODS = ('weight_norm', 'sigma_reparam', 'residual_scaling_he', 'residual_scaling_small')
LR_METHODS = ('small_rapid', 'wesar')
FIGURE_METHODS = ('small_rapid', 'wesar')  # these, first seed: update-ratio monitor and MLflow
# The study: every arm at every study shape, except the literal sigma^2 = 4e-5 ('wesar') at the first.
STUDY_ARMS = ('small_rapid', 'wesar_width', 'matrix_lr', 'small_od_lr', 'small_qkln')
STUDY_LITERAL = 'wesar'
# Half-decades around each family's optimum and past it: WeSaR's actual weights are smaller,
# so the same lr is a larger relative step (lr / sigma against lr / s_small).
_SMALL_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
_SIGMA_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
STUDY_LRS = {
    'small_rapid': _SMALL_LRS,
    'small_od_lr': _SMALL_LRS,
    'small_qkln': _SMALL_LRS,
    'wesar_width': _SIGMA_LRS,
    'matrix_lr': _SIGMA_LRS,
    'wesar': _SIGMA_LRS,
}
# The refinement: the arms of rules 1 to 3 of the study's decision rule, at the learning rates
# halfway (geometric mean) between each one's best study lr and its neighbours, from the results.
REFINE_ARMS = ('small_rapid', 'small_od_lr', 'wesar_width', 'matrix_lr')
WIDTH_SIGMA_CONSTANT = 0.081  # sigma^2 = 0.081 / d: the paper's 4e-5 at d = 2048, sigma / s_small(d) = 0.45 at any d


# The ablation: seven arms on one grid of lr / sigma (sigma: the std of the arm's actual weights, so
# equal points are equal relative steps), three depths at d 64, each arm's points near its expected
# optimum at three seeds, the far ones at one.
ABLATION_ARMS = (
    'small_rapid',
    'wesar_width',
    'wesar_width_fixed',
    'matrix_lr',
    'matrix_lr_clip',
    'small_od_lr',
    'wesar_width_small',
)
ABLATION_SHAPES = ('base', 'd64-L8', 'd64-L16')
ABLATION_GRID = tuple(range(-5, 1))  # k: lr / sigma = 10^(k/4), quarter decades from 0.056 to 1.0
# The expected optimum k of each arm, from the earlier study's refined bests at d 64 (lr / sigma):
# Small init 0.13-0.22 (k -3.6 to -2.6), WeSaR and its twin 0.154 (k -3.2), W_o/W_d lr 0.22-0.38
# (k -2.6 to -1.7). Fixed gates and the matched-clipping twin take WeSaR's; WeSaR on the Small
# backbone, equal relative steps on Small init's scales like the W_o/W_d-lr arm, takes that arm's.
ABLATION_OPTIMUM = {
    'small_rapid': -4,
    'wesar_width': -3,
    'wesar_width_fixed': -3,
    'matrix_lr': -3,
    'matrix_lr_clip': -3,
    'small_od_lr': -2,
    'wesar_width_small': -2,
}
ABLATION_SEEDS = (0, 1, 2)  # at the near points (the expected optimum, one below, two above); far points: the first
ABLATION_NEAR = (-1, 0, 1, 2)  # offsets from the expected optimum
ABLATION_EXTENSION_LIMIT = (-8, 2)  # the extension rule adds points up to lr / sigma = 10^(-2) .. 10^(1/2)
# The gate-free twin's clipping threshold matched to what WeSaR's clip sees: WeSaR's gradient on W_r is
# a_r = s_r / sigma times the twin's; s_r / sigma = 1 / sqrt(0.081) for e, q, k, v, u and p at every
# width (W_o, W_d: that over sqrt(2N) and sqrt(4N)), so the twin clipped at sqrt(0.081) clips when WeSaR would.
MATCHED_CLIPPING = 0.2846  # sqrt(WIDTH_SIGMA_CONSTANT), to 4 digits


def arm_sigma(method: str, d_model: int) -> float:
    """The std of the arm's actual weights: lr / arm_sigma is its relative step per matrix under Adam."""
    if method in ('wesar_width', 'matrix_lr', 'wesar_width_fixed', 'matrix_lr_clip', 'wesar_width_small'):
        return math.sqrt(WIDTH_SIGMA_CONSTANT / d_model)
    if method == 'wesar':
        return math.sqrt(4e-5)
    return math.sqrt(2.0 / (5.0 * d_model))  # Small init's std, for the Small-init arms


def ablation_lr(method: str, d_model: int, k: int) -> float:
    """The learning rate of grid point ``k`` (lr / sigma = 10^(k/4)) of an arm, to 3 significant digits."""
    return float(f'{10 ** (k / 4) * arm_sigma(method, d_model):.3g}')


def ablation_points(method: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The arm's grid points (k) near its expected optimum (three seeds) and the far ones (one seed)."""
    near = tuple(ABLATION_OPTIMUM[method] + o for o in ABLATION_NEAR if ABLATION_OPTIMUM[method] + o in ABLATION_GRID)
    return near, tuple(k for k in ABLATION_GRID if k not in near)


def refine_lrs(method: str, best_lr: float) -> tuple[float, ...]:
    """The learning rates halfway, on a log scale, between ``best_lr`` and its neighbours in the arm's
    STUDY_LRS (a quarter-decade or so each side), to 3 significant digits."""
    lrs = STUDY_LRS[method]
    if best_lr not in lrs:
        raise ValueError(f'best lr {best_lr:g} of {method!r} is not one of its study learning rates {lrs}')
    i = lrs.index(best_lr)
    neighbours = [lrs[j] for j in (i - 1, i + 1) if 0 <= j < len(lrs)]
    return tuple(float(f'{math.sqrt(best_lr * n):.3g}') for n in neighbours)


def study_sigma_squared(method: str, d_model: int) -> float:
    """sigma^2 of a study arm: width-scaled for WeSaR and its per-matrix-lr twins, Small's own std for small_od_lr."""
    if method in ('wesar_width', 'matrix_lr', 'wesar_width_fixed', 'matrix_lr_clip', 'wesar_width_small'):
        return WIDTH_SIGMA_CONSTANT / d_model
    if method == 'small_od_lr':
        return 2.0 / (5.0 * d_model)
    raise ValueError(f'no study sigma^2 for method {method!r}')


# Model shapes: d_model, n_layers, n_heads. `deep` is deep and narrow: 1/sqrt(2N) = 1/sqrt(32).
SHAPES: dict[str, dict[str, int]] = {
    'base': {'d_model': 64, 'n_layers': 4, 'n_heads': 4},
    'deep': {'d_model': 32, 'n_layers': 16, 'n_heads': 4},
    # the study: three depths at d 64 (base is d64-L4) and a second width
    'd64-L2': {'d_model': 64, 'n_layers': 2, 'n_heads': 4},
    'd64-L8': {'d_model': 64, 'n_layers': 8, 'n_heads': 4},
    'd128-L4': {'d_model': 128, 'n_layers': 4, 'n_heads': 4},
    # the ablation: base, d64-L8 and a third depth
    'd64-L16': {'d_model': 64, 'n_layers': 16, 'n_heads': 4},
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
    study_shapes: tuple[str, ...] = ('base', 'd64-L2', 'd64-L8', 'd128-L4')  # literal sigma^2 at the first
    study_seeds: tuple[int, ...] = (0, 1)
    study_lr_points: int = 5  # the first n of each arm's STUDY_LRS
    ablation_shapes: tuple[str, ...] = ABLATION_SHAPES
    ablation_seeds: tuple[int, ...] = ABLATION_SEEDS


FULL = Scale(
    vocab_size=1024,
    seq_len=64,
    batch=16,
    steps=240,
    eval_batches=8,
    monitor_interval=4,
    seeds=(0, 1, 2),
    lrs=(3e-4, 3e-3, 1e-2, 3e-2),
    shapes=('base', 'deep'),
    lr_shapes=('deep', 'base'),
    reparam_shapes=('base',),
    reparam_seeds=(0, 1, 2),
    lr_seeds=(0, 1, 2),
)
QUICK = Scale(
    vocab_size=512,
    seq_len=64,
    batch=4,
    steps=8,
    eval_batches=1,
    monitor_interval=2,
    seeds=(0,),
    lrs=(1e-2,),
    shapes=('base', 'deep'),
    lr_shapes=('base',),
    reparam_shapes=('base',),
    reparam_seeds=(0,),
    max_chars=300_000,
    every_method_every_shape=False,
    study_shapes=('base', 'deep'),
    study_seeds=(0,),
    study_lr_points=2,
    ablation_shapes=('base', 'deep'),
    ablation_seeds=(0,),
)
QUICK_SHAPES = {
    'base': {'d_model': 32, 'n_layers': 2, 'n_heads': 2},
    'deep': {'d_model': 16, 'n_layers': 6, 'n_heads': 2},
}

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
    group: str  # main | reparam | lr | study | refine | ablation
    method: str
    shape: str
    seed: int
    lr: float
    monitor: bool = False

    @property
    def name(self) -> str:
        return f'{self.group}-{self.shape}-{self.method}-lr{self.lr:g}-s{self.seed}'


def plan(
    scale: Scale,
    groups: Sequence[str] = ('main', 'reparam', 'lr'),
    study_best: Optional[dict[tuple[str, str], float]] = None,
    shapes: Optional[dict[str, dict[str, int]]] = None,
    ablation_rows: Sequence[dict] = (),
) -> list[RunSpec]:
    """The runs of a grid, the most informative first: two seeds of the main grid, the lr sweep,
    the compared reparameterizations, then the other seeds of the main grid and of the lr sweep
    (a deadline cuts from the end); then the study, then its refinement, which needs the study's
    best learning rate of each (shape, arm) in ``study_best``; then the ablation: every seed of the
    points near each arm's expected optimum, then the far points (cut first by a deadline), then the
    points its extension rule adds from the results so far (``ablation_rows``). ``shapes``: the
    model shapes (default SHAPES)."""
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
    if 'study' in groups:
        for i, shape in enumerate(scale.study_shapes):  # the depth series first, both seeds; a deadline cuts the width
            for seed in scale.study_seeds:
                arms = STUDY_ARMS + ((STUDY_LITERAL,) if i == 0 else ())
                for method in arms:
                    for lr in STUDY_LRS[method][: scale.study_lr_points]:
                        monitor = seed == scale.study_seeds[0]
                        specs.append(RunSpec('study', method, shape, seed, lr, monitor))
    if 'refine' in groups:
        if not study_best:
            raise ValueError("group 'refine' needs the study's results: run --groups study first, into the same --out")
        for shape in scale.study_shapes:
            for seed in scale.study_seeds:
                for method in REFINE_ARMS:
                    if (shape, method) in study_best:
                        for lr in refine_lrs(method, study_best[(shape, method)]):
                            specs.append(RunSpec('refine', method, shape, seed, lr))
    if 'ablation' in groups:
        specs += ablation_plan(scale, shapes or SHAPES, ablation_rows)
    return specs


def ablation_plan(scale: Scale, shapes: dict[str, dict[str, int]], rows: Sequence[dict] = ()) -> list[RunSpec]:
    """The ablation's runs: the near points at every seed, the far points at the first seed and what
    :func:`ablation_extension` adds from ``rows``, in the order of :func:`ablation_priority`."""
    specs = []
    for seed in scale.ablation_seeds:
        for shape in scale.ablation_shapes:
            for method in ABLATION_ARMS:
                for k in ablation_points(method)[0]:
                    specs.append(
                        RunSpec('ablation', method, shape, seed, ablation_lr(method, shapes[shape]['d_model'], k))
                    )
    for shape in scale.ablation_shapes:
        for method in ABLATION_ARMS:
            for k in ablation_points(method)[1]:
                lr = ablation_lr(method, shapes[shape]['d_model'], k)
                specs.append(RunSpec('ablation', method, shape, scale.ablation_seeds[0], lr))
    planned = {s.name for s in specs}
    specs += [s for s in ablation_extension(rows, scale, shapes) if s.name not in planned]
    return ablation_priority(specs, rows, scale, shapes)


def _best_points(rows: Sequence[dict], scale: Scale, shapes: dict[str, dict[str, int]]) -> dict[tuple[str, str], int]:
    """The best grid point k so far of each (shape, arm): lowest mean validation loss over its seeds
    (a diverged run counts as ln(vocab))."""
    l0 = math.log(scale.vocab_size)
    by_arm: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if r['group'] != 'ablation' or r['shape'] not in scale.ablation_shapes:
            continue
        k = ablation_k(r['method'], shapes[r['shape']]['d_model'], r['lr'])
        loss = r['val_loss'] if not r['diverged'] and math.isfinite(r['val_loss']) else l0
        by_arm.setdefault((r['shape'], r['method']), {}).setdefault(k, []).append(min(loss, l0))
    return {arm: min(points, key=lambda k: (sum(points[k]) / len(points[k]), k)) for arm, points in by_arm.items()}


def ablation_priority(
    specs: Sequence[RunSpec], rows: Sequence[dict], scale: Scale, shapes: dict[str, dict[str, int]]
) -> list[RunSpec]:
    """``specs`` in the order a deadline should cut them last to first: every seed of the best point
    and its two neighbours (the pairs of the verdicts), then the first seed of the points further out
    (the sweep the basins need), then the other seeds of those, each by distance |k - best k| from
    the (shape, arm)'s best so far (from ``rows``; the expected optimum where it has none). The order
    is kept within a distance (seed by seed)."""
    best = _best_points(rows, scale, shapes)

    def priority(s: RunSpec) -> tuple[int, int]:
        k = ablation_k(s.method, shapes[s.shape]['d_model'], s.lr)
        distance = abs(k - best.get((s.shape, s.method), ABLATION_OPTIMUM[s.method]))
        if distance <= 1:
            return 0, distance
        return (1 if s.seed == scale.ablation_seeds[0] else 2), distance

    return sorted(specs, key=priority)


def ablation_k(method: str, d_model: int, lr: float) -> int:
    """The grid point of ``lr`` for an arm: k with lr / sigma = 10^(k/4) (the inverse of :func:`ablation_lr`)."""
    return round(4 * math.log10(lr / arm_sigma(method, d_model)))


def ablation_extension(rows: Sequence[dict], scale: Scale, shapes: dict[str, dict[str, int]]) -> list[RunSpec]:
    """The extension rule, applied to the ablation's results so far (``rows``): for each (shape, arm),
    with L its best point (lowest mean validation loss; a diverged run counts as ln(vocab)), the point
    below L and the two above it get every seed (so an L at either end of the grid gains the point
    beyond it, and an L at a far point gains the seeds it lacks). Points beyond ABLATION_EXTENSION_LIMIT are not added; runs already planned or done
    are skipped by name, so a rerun of the group adds only what is missing.
    """
    specs = []
    for (shape, method), best in _best_points(rows, scale, shapes).items():
        wanted = {best - 1, best, best + 1, best + 2}
        lo, hi = ABLATION_EXTENSION_LIMIT
        for k in sorted(wanted):
            if not lo <= k <= hi:
                continue
            lr = ablation_lr(method, shapes[shape]['d_model'], k)
            for seed in scale.ablation_seeds:
                specs.append(RunSpec('ablation', method, shape, seed, lr))
    return specs


# Wall seconds of one run at 240 steps, two runs at a time, d 64: the study's refinement runs (load about
# 4) took a median 25 s at N 4 and 53 s at N 8; linear in N between and beyond them.
_SECONDS_N4, _SECONDS_PER_LAYER = 25.0, 7.0


def estimate_seconds(spec: RunSpec, scale: Scale, shapes: dict[str, dict[str, int]]) -> float:
    """The expected wall time of one run at ``--jobs 2`` on a quiet 2-core machine (d 64 models)."""
    n = shapes[spec.shape]['n_layers']
    width = shapes[spec.shape]['d_model'] / 64
    return (_SECONDS_N4 + _SECONDS_PER_LAYER * (n - 4)) * width * scale.steps / FULL.steps


def run_settings(spec: RunSpec, scale: Scale) -> dict[str, Any]:
    """Batch, steps, warmup and lr of one run: the paper's setting mapped onto ``scale``."""
    setting = SETTINGS[METHODS[spec.method][2]]
    factor = setting['batch_factor']
    steps = max(scale.steps // factor, 1)
    warmup = max(MIN_WARMUP, round(setting['warmup_fraction'] * steps))
    return {
        'setting': METHODS[spec.method][2],
        'batch': scale.batch * factor,
        'steps': steps,
        'warmup': min(warmup, steps),
        'lr': spec.lr,
        'tokens': scale.batch * factor * steps * scale.seq_len,
    }


def _method_algorithms(method: str, shape: dict[str, int]) -> dict[str, Any]:
    from omegaconf import OmegaConf as om

    if METHODS[method][1]:
        with method_part(METHODS[method][1]).open() as f:
            part = cast(dict[str, Any], om.to_container(om.load(f)))['algorithms']
    else:
        part = _study_algorithms(method, shape['d_model'])
    clipping: Any = '${variables.clipping}'
    if method == 'matrix_lr_clip':
        clipping = {'clipping_type': 'norm', 'clipping_threshold': MATCHED_CLIPPING}
    return {'gradient_clipping': clipping, 'z_loss': '${variables.z_loss}', **part}


def _study_algorithms(method: str, d_model: int) -> dict[str, Any]:
    """The algorithms of a study arm whose sigma^2 depends on the width."""
    sigma_squared = study_sigma_squared(method, d_model)
    if method in ('wesar_width', 'wesar_width_fixed', 'wesar_width_small'):
        return {
            'wesar': {
                'sigma_squared': sigma_squared,
                'backbone': 'small' if method == 'wesar_width_small' else 'he',
                'trainable_gates': method != 'wesar_width_fixed',
                'gate_weight_decay': 0.0,
                'embedding_scaling': True,
            }
        }
    backbone = 'he' if method in ('matrix_lr', 'matrix_lr_clip') else 'small'
    return {'paper_init': {'backbone': backbone, 'embedding_scaling': True, 'matrix_lr_sigma_squared': sigma_squared}}


def build_config(
    spec: RunSpec,
    scale: Scale,
    shapes: dict[str, dict[str, int]],
    data_root: str,
    tracking_uri: str,
    out_dir: Path,
    demo_yaml=None,
):
    """The demo YAML (``demo_yaml``, default the packaged one) with this run's method, shape, seed,
    setting, callbacks and logger."""
    from omegaconf import OmegaConf as om

    from wesar_composer.tools.demo_yaml import load_config

    s = run_settings(spec, scale)
    shape = shapes[spec.shape]
    cfg = load_config(demo_yaml, [])
    container = cast(dict[str, Any], om.to_container(cfg, resolve=False))
    container['variables'].update(
        {
            'data_root': data_root,
            'vocab_size': scale.vocab_size,
            'max_seq_len': scale.seq_len,
            'global_seed': spec.seed,
            'run_name': spec.name,
            'mlflow_experiment': MLFLOW_EXPERIMENT,
            'mlflow_tracking_uri': tracking_uri,
        }
    )
    container['variables']['algorithms_of'] = {spec.method: _method_algorithms(spec.method, shape)}
    container['model'].update(shape)
    if spec.method == 'small_qkln':
        container['model']['attn_config']['qk_ln'] = True
    container.update(
        {
            'global_train_batch_size': s['batch'],
            'device_train_microbatch_size': s['batch'],
            'max_duration': f'{s["steps"]}ba',
            'eval_interval': f'{s["steps"]}ba',
            'eval_subset_num_batches': scale.eval_batches,
        }
    )
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
        if spec.group == 'study':  # the d/u gap only
            callbacks['update_ratio_monitor'].update(log_interval=2 * scale.monitor_interval, families=['update_ratio'])
    else:
        callbacks.pop('update_ratio_monitor', None)
        container['loggers'] = {}
    return om.create(container)


def method_part(name: str):
    """The packaged method part ``name`` (e.g. ``wesar``): a readable resource, from a wheel or a checkout."""
    part = resources.files('wesar_composer.tools').joinpath(METHOD_PARTS, f'{name}.yaml')
    if not part.is_file():
        raise FileNotFoundError(f'Method part {name!r} not found in the package data ({METHOD_PARTS}).')
    return part
