"""Weight Normalization (Salimans and Kingma 2016), compared with WeSaR in Tables 4, 6 and 12."""

from wesar_composer.algorithms.weight_norm.modules import WeightNormEmbedding, WeightNormLinear
from wesar_composer.algorithms.weight_norm.weight_norm import WeightNorm, apply_weight_norm

__all__ = ['WeightNorm', 'apply_weight_norm', 'WeightNormLinear', 'WeightNormEmbedding']
