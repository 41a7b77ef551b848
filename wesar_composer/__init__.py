"""wesar-composer: WeSaR (weight scaling as reparameterization) for Composer and llm-foundry."""

from wesar_composer.algorithms.paper_init import PaperInit, apply_paper_init
from wesar_composer.algorithms.wesar import WeSaR, apply_wesar, gate_table, merge_gates
from wesar_composer.algorithms.z_loss import ZLoss
from wesar_composer.callbacks import LossSpikeCounter, UpdateRatioMonitor

__all__ = ['WeSaR', 'apply_wesar', 'gate_table', 'merge_gates', 'UpdateRatioMonitor', 'LossSpikeCounter', 'ZLoss',
           'PaperInit', 'apply_paper_init']
__version__ = '0.1.0'
