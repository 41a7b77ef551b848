"""WeSaR: weight scaling as reparameterization (Nishida et al. 2024)."""

from wesar_composer.algorithms.wesar.gates import gate_table, merge_gates
from wesar_composer.algorithms.wesar.modules import GatedEmbedding, GatedLinear
from wesar_composer.algorithms.wesar.wesar import WeSaR, WeSaRConfig, apply_wesar

__all__ = ['WeSaR', 'WeSaRConfig', 'apply_wesar', 'gate_table', 'merge_gates', 'GatedLinear', 'GatedEmbedding']
