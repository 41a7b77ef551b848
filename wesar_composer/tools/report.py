"""The demo's ``report.md``: the table of both runs, how each number was measured, the pictures."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from wesar_composer.tools.training import RunResult

__all__ = ['METHOD_LABELS', 'evaluated_text', 'fmt', 'write_report']

METHOD_LABELS = {'small_init': 'Small init (baseline)', 'wesar': 'WeSaR'}


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``; ``-`` for None."""
    return '-' if value is None else format(value, spec)


def evaluated_text(data_summary: dict[str, Any]) -> str:
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
            f'{r.spikes if r.spikes is not None else "-"} | {fmt(r.d_over_u, ".2f")} / {fmt(r.d_over_u_last, ".2f")} | '
            f'{r.wall_seconds / 60:.1f} min |',
        )
    lines += [
        '',
        f'- val loss: cross entropy (nats/token) on {evaluated_text(data_summary)} after the last step; '
        'perplexity = exp(loss).',
        '- loss spikes: `loss_spike_counter` (a batch whose loss is >= 1.5x the median of the recent '
        'non-spike losses starts a spike, from the 4th batch on).',
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
