"""A ``results.csv`` row of ``wesar-experiments`` for tests that render tables from hand-made results."""

from __future__ import annotations

import math


def results_row(method: str, seed: int, val_loss: float, **overrides) -> dict:
    """A finished main-grid run of ``method`` on the base shape (d 64, N 4, rapid, lr 1e-3); ``overrides`` win."""
    from wesar_composer.tools.experiments import METHODS

    row = dict(
        group='main',
        method=method,
        label=METHODS[method][0],
        shape='base',
        d_model=64,
        n_layers=4,
        seed=seed,
        setting='rapid',
        lr=1e-3,
        batch=16,
        steps=120,
        warmup=2,
        tokens=120 * 16 * 64,
        n_params=1000,
        val_loss=val_loss,
        val_ppl=math.exp(val_loss),
        final_train_loss=val_loss,
        spikes=0,
        diverged=0,
        d_over_u_last=1.0,
        wall_s=100.0,
        batch_s=0.5,
        run_name=f'main-base-{method}-s{seed}',
        run_id='',
    )
    row.update(overrides)
    return row
