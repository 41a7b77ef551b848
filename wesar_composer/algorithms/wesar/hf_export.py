"""Hugging Face export of a WeSaR model: gates folded into the weights (W <- a * W).

The exported checkpoint is the merged, ungated model and loads with plain ``transformers``.
MPT's tied head keeps its own gate as ``logit_scale``; a Hugging Face tied head is untied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wesar_composer.algorithms.wesar.gated_modules import GatedEmbedding, GatedLinear
from wesar_composer.hf_export import fold_on_hf_export
from wesar_composer.roles import unwrap

__all__ = ['fold_gates_on_hf_export']

GATED = (GatedLinear, GatedEmbedding)


def _fold_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    weight_key = prefix + 'weight'
    with torch.no_grad():
        scale = module.row_gates() if isinstance(module, GatedLinear) else module.gate * module.output_scale
        weight = state_dict[weight_key]
        state_dict[weight_key] = weight * scale.detach().to(device=weight.device, dtype=weight.dtype)
    state_dict.pop(prefix + 'gate', None)
    state_dict.pop(prefix + 'unembed_gate', None)
    return state_dict


def fold_gates_on_hf_export(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the merged model."""

    def edit_config(config):
        embedding = next((m for m in model.modules() if isinstance(m, GatedEmbedding)), None)
        if embedding is not None and embedding.unembed_gate is not None:  # MPT tied head
            factor = (embedding.unembed_gate / (embedding.gate * embedding.output_scale)).item()
            config.logit_scale = (getattr(unwrap(model), 'logit_scale', None) or 1.0) * factor
        elif getattr(config, 'tie_word_embeddings', False):
            config.tie_word_embeddings = False  # e and p carry different gates
        return config

    fold_on_hf_export(checkpointer, GATED, _fold_hook, edit_config)
