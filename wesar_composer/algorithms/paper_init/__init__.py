"""Faithful baseline initializations of the paper (Table 1): Small and He init with embedding scaling."""

from wesar_composer.algorithms.paper_init.paper_init import PaperInit, apply_paper_init, paper_init_stds
from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding

__all__ = ['PaperInit', 'apply_paper_init', 'paper_init_stds', 'ScaledEmbedding']
