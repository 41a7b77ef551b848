"""wesar-composer: WeSaR (weight scaling as reparameterization) for Composer and llm-foundry.

The public names load on first use (PEP 562), so that a console script of the package's tools
does not import Composer and llm-foundry before it needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version('wesar-composer')
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = '0+unknown'

_HOMES = {
    'WeSaR': 'wesar_composer.algorithms.wesar',
    'apply_wesar': 'wesar_composer.algorithms.wesar',
    'gate_table': 'wesar_composer.algorithms.wesar',
    'merge_gates': 'wesar_composer.algorithms.wesar',
    'UpdateRatioMonitor': 'wesar_composer.callbacks',
    'LossSpikeCounter': 'wesar_composer.callbacks',
    'SpikeGuard': 'wesar_composer.callbacks',
    'ZLoss': 'wesar_composer.algorithms.z_loss',
    'PaperInit': 'wesar_composer.algorithms.paper_init',
    'apply_paper_init': 'wesar_composer.algorithms.paper_init',
    'WeightNorm': 'wesar_composer.algorithms.weight_norm',
    'apply_weight_norm': 'wesar_composer.algorithms.weight_norm',
    'SigmaReparam': 'wesar_composer.algorithms.sigma_reparam',
    'apply_sigma_reparam': 'wesar_composer.algorithms.sigma_reparam',
    'ResidualScaling': 'wesar_composer.algorithms.residual_scaling',
    'apply_residual_scaling': 'wesar_composer.algorithms.residual_scaling',
    'merge_reparameterization': 'wesar_composer.reparam.fold',
}

__all__ = [
    'WeSaR',
    'apply_wesar',
    'gate_table',
    'merge_gates',
    'UpdateRatioMonitor',
    'LossSpikeCounter',
    'SpikeGuard',
    'ZLoss',
    'PaperInit',
    'apply_paper_init',
    'WeightNorm',
    'apply_weight_norm',
    'SigmaReparam',
    'apply_sigma_reparam',
    'ResidualScaling',
    'apply_residual_scaling',
    'merge_reparameterization',
]

if TYPE_CHECKING:
    from wesar_composer.algorithms.paper_init import PaperInit, apply_paper_init
    from wesar_composer.algorithms.residual_scaling import ResidualScaling, apply_residual_scaling
    from wesar_composer.algorithms.sigma_reparam import SigmaReparam, apply_sigma_reparam
    from wesar_composer.algorithms.weight_norm import WeightNorm, apply_weight_norm
    from wesar_composer.algorithms.wesar import WeSaR, apply_wesar, gate_table, merge_gates
    from wesar_composer.algorithms.z_loss import ZLoss
    from wesar_composer.callbacks import LossSpikeCounter, SpikeGuard, UpdateRatioMonitor
    from wesar_composer.reparam.fold import merge_reparameterization


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
