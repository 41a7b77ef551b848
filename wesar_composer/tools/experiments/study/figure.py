"""The study's figure: validation loss against lr and against lr / sigma."""

from __future__ import annotations

from pathlib import Path

from wesar_composer.tools.experiments.grid import METHODS, SHAPES
from wesar_composer.tools.experiments.study.arms import ARM_ORDER, INITIAL_LOSS, _shape_label, _sigma, summarize


def plot_study(out_dir: Path, rows: list[dict]) -> list[str]:
    """Validation loss against lr and against lr / sigma, one column per shape."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    shapes = [s for s in ('d64-L2', 'base', 'd64-L8', 'd128-L4') if any(k[0] == s for k in summary)]
    if not shapes:
        return []
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False, sharey=True)
    for col, shape in enumerate(shapes):
        d = SHAPES[shape]['d_model']
        for method in ARM_ORDER:
            s = summary.get((shape, method))
            if s is None:
                continue
            style = '--' if method in ('matrix_lr', 'small_od_lr') else '-'
            for row, x in enumerate((s.lrs, [lr / _sigma(method, d) for lr in s.lrs])):
                axes[row][col].plot(x, s.means, style, marker='o', label=METHODS[method][0])
        axes[0][col].set_title(_shape_label(shape))
        axes[0][col].set_xlabel('peak learning rate')
        axes[1][col].set_xlabel('lr / sigma (sigma: std of the actual weights)')
        for row in (0, 1):
            axes[row][col].set_xscale('log')
            axes[row][col].grid(alpha=0.3)
    for row in (0, 1):
        axes[row][0].set_ylabel('validation loss')
    axes[0][0].set_ylim(top=INITIAL_LOSS)
    legend = {}
    for ax in axes[0]:  # every arm once, the literal sigma's too (first shape only)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc='lower center', ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out_dir / 'figures' / 'study_lr.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
