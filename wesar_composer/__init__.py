"""wesar-composer: WeSaR (weight scaling as reparameterization) for Composer and llm-foundry."""

from importlib.metadata import PackageNotFoundError, version

from wesar_composer.algorithms.paper_init import PaperInit, apply_paper_init
from wesar_composer.algorithms.residual_scaling import ResidualScaling, apply_residual_scaling
from wesar_composer.algorithms.sigma_reparam import SigmaReparam, apply_sigma_reparam
from wesar_composer.algorithms.weight_norm import WeightNorm, apply_weight_norm
from wesar_composer.algorithms.wesar import WeSaR, apply_wesar, gate_table, merge_gates
from wesar_composer.algorithms.z_loss import ZLoss
from wesar_composer.callbacks import LossSpikeCounter, UpdateRatioMonitor
from wesar_composer.reparam.fold import merge_reparameterization

try:
    __version__ = version('wesar-composer')
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = '0+unknown'

__all__ = [
    'WeSaR',
    'apply_wesar',
    'gate_table',
    'merge_gates',
    'UpdateRatioMonitor',
    'LossSpikeCounter',
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
