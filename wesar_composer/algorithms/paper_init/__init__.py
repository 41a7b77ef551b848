"""Faithful baseline initializations of the paper (Table 1): Small and He init with embedding scaling."""

from wesar_composer.algorithms.paper_init.modules import ScaledEmbedding
from wesar_composer.algorithms.paper_init.paper_init import PaperInit, PaperInitConfig, apply_paper_init

__all__ = ['PaperInit', 'PaperInitConfig', 'apply_paper_init', 'ScaledEmbedding']
