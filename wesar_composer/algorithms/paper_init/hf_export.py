"""Hugging Face export of a paper_init model through llm-foundry's ``hf_checkpointer``.

A plain MPT or Llama has no embedding scaling, so the export folds it into the weights:
W_e <- W_e * output_scale. A tied MPT head shares W_e and would then see it scaled too, so the
exported config divides ``logit_scale`` by the same factor; a tied Hugging Face head is untied
(its weight keeps the unscaled W_e). The exported model gives the same logits and loads with
plain ``transformers``; Composer's own checkpoints keep the unscaled W_e.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding
from wesar_composer.roles import unwrap

__all__ = ['scaled_state_dict', 'fold_embedding_scale_on_hf_export']


def _fold_hook(module: ScaledEmbedding, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    key = prefix + 'weight'
    if isinstance(state_dict.get(key), torch.Tensor):
        state_dict[key] = state_dict[key] * module.output_scale
    return state_dict


@contextlib.contextmanager
def scaled_state_dict(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``state_dict()`` of ``model`` holds W_e * output_scale."""
    handles = [m._register_state_dict_hook(_fold_hook) for m in model.modules() if isinstance(m, ScaledEmbedding)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fold_embedding_scale_on_hf_export(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the model with embedding scaling folded in."""
    get_hf_model = checkpointer._get_hf_model
    transform_config = checkpointer.transform_config

    def _get_hf_model(state):
        with scaled_state_dict(state.model):
            return get_hf_model(state)

    def _transform_config(original_config):
        config = transform_config(original_config)
        embedding = next((m for m in model.modules() if isinstance(m, ScaledEmbedding)), None)
        if embedding is None or not getattr(config, 'tie_word_embeddings', False):
            return config
        if hasattr(config, 'logit_scale'):  # MPT: the head is the embedding, unembed=True
            current = getattr(unwrap(model), 'logit_scale', None)
            config.logit_scale = (current if isinstance(current, (int, float)) else 1.0) / embedding.output_scale
        else:
            config.tie_word_embeddings = False
        return config

    checkpointer._get_hf_model = _get_hf_model
    checkpointer.transform_config = _transform_config
