"""paper_init's module: the token embedding with embedding scaling, ``W_e[x] * scale`` with ``scale = 1 / std(W_e)``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from llmfoundry.models.layers.custom_embedding import SharedEmbedding

from wesar_composer.reparam.modules import Reparameterized

__all__ = ['ScaledEmbedding', 'METHOD']

METHOD = 'paper_init'


class ScaledEmbedding(Reparameterized, SharedEmbedding):
    """llm-foundry's ``SharedEmbedding`` whose output is multiplied by a constant ``output_scale``.

    Embedding scaling (Vaswani et al. 2017; Takase et al. 2023): with W_e ~ N(0, s_e^2) and
    ``output_scale = 1 / s_e`` the residual stream starts at unit variance. The scale is a
    plain attribute, not a parameter or buffer, so the state dict keeps the keys of the plain
    embedding; the fold multiplies W_e by it. A tied prediction head (``unembed=True``) uses
    W_e unscaled. Its weights are drawn by paper_init (``reset_parameters`` is the embedding's own).
    """

    reparam_method = METHOD

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, output_scale: float = 1.0, **kwargs):
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.output_scale = float(output_scale)

    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        out = super().forward(input, unembed=unembed)
        return out if unembed else out * self.output_scale

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'weight': tensors['weight'] * self.output_scale}

    def unembed_factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        return 1.0 / self.output_scale

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, output_scale={self.output_scale:.4g}'
