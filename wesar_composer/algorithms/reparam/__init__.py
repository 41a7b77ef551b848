"""Shared by the compared reparameterizations (weight_norm, sigma_reparam, residual_scaling): checks and fold-back."""

from wesar_composer.algorithms.reparam.common import applied_method
from wesar_composer.algorithms.reparam.fold import fold_reparam_on_hf_export, folded_state_dict, merge_reparameterization

__all__ = ['merge_reparameterization', 'folded_state_dict', 'fold_reparam_on_hf_export', 'applied_method']
