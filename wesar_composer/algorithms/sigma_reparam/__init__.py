"""sigma-Reparam (Zhai et al. 2023), compared with WeSaR in Tables 4, 6 and 12."""

from wesar_composer.algorithms.sigma_reparam.modules import (
    SigmaReparamEmbedding,
    SigmaReparamLinear,
    request_power_iteration,
)
from wesar_composer.algorithms.sigma_reparam.sigma_reparam import SigmaReparam, apply_sigma_reparam

__all__ = [
    'SigmaReparam',
    'apply_sigma_reparam',
    'request_power_iteration',
    'SigmaReparamLinear',
    'SigmaReparamEmbedding',
]
