"""Hugging Face export of a paper_init model: embedding scaling folded into W_e.

A plain MPT or Llama has no embedding scaling, so the export folds it into the weights:
W_e <- W_e * output_scale. A tied MPT head shares W_e and would then see it scaled too, so the
exported config divides ``logit_scale`` by the same factor; a tied Hugging Face head is untied
(its weight keeps the unscaled W_e). The exported model gives the same logits and loads with
plain ``transformers``; Composer's own checkpoints keep the unscaled W_e.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding
from wesar_composer.hf_export import fold_on_hf_export
from wesar_composer.roles import unwrap

__all__ = ['fold_embedding_scale_on_hf_export']


def _fold_hook(module: ScaledEmbedding, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    key = prefix + 'weight'
    if isinstance(state_dict.get(key), torch.Tensor):
        state_dict[key] = state_dict[key] * module.output_scale
    return state_dict


def fold_embedding_scale_on_hf_export(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the model with embedding scaling folded in."""

    def edit_config(config):
        embedding = next((m for m in model.modules() if isinstance(m, ScaledEmbedding)), None)
        if embedding is None or not getattr(config, 'tie_word_embeddings', False):
            return config
        if hasattr(config, 'logit_scale'):  # MPT: the head is the embedding, unembed=True
            current = getattr(unwrap(model), 'logit_scale', None)
            config.logit_scale = (current if isinstance(current, (int, float)) else 1.0) / embedding.output_scale
        else:
            config.tie_word_embeddings = False
        return config

    fold_on_hf_export(checkpointer, (ScaledEmbedding,), _fold_hook, edit_config)
