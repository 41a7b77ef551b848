"""wesar-composer: WeSaR (weight scaling as reparameterization) for Composer and llm-foundry."""

from wesar_composer.algorithms.wesar import WeSaR, apply_wesar, gate_table, merge_gates
from wesar_composer.callbacks import LossSpikeCounter, UpdateRatioMonitor

__all__ = ['WeSaR', 'apply_wesar', 'gate_table', 'merge_gates', 'UpdateRatioMonitor', 'LossSpikeCounter']
__version__ = '0.1.0'
