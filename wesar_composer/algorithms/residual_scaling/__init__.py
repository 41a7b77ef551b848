"""Residual scaling as reparameterization (Noci et al. 2022), compared with WeSaR in Tables 4, 6 and 12."""

from wesar_composer.algorithms.residual_scaling.modules import ResidualScaledLinear
from wesar_composer.algorithms.residual_scaling.residual_scaling import (
    ResidualScaling,
    ResidualScalingConfig,
    apply_residual_scaling,
)

__all__ = ['ResidualScaling', 'ResidualScalingConfig', 'apply_residual_scaling', 'ResidualScaledLinear']
