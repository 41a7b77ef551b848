"""Hugging Face export of a WeSaR model through llm-foundry's ``hf_checkpointer``.

The checkpointer builds a plain model from the config and loads the gathered state dict into
it. For a gated model the gates are folded into that state dict on the way out (W <- a * W,
gate keys dropped), so the exported checkpoint is the merged, ungated model and loads with
plain ``transformers``. Composer's own checkpoints keep the gates.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from wesar_composer.algorithms.wesar.gated_modules import GatedEmbedding, GatedLinear
from wesar_composer.roles import unwrap

__all__ = ['folded_state_dict', 'fold_gates_on_hf_export']


def _fold_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    weight_key = prefix + 'weight'
    with torch.no_grad():
        if isinstance(module, GatedLinear):
            scale = module.row_gates()
        else:
            scale = module.gate * module.output_scale
        weight = state_dict[weight_key]
        state_dict[weight_key] = weight * scale.detach().to(device=weight.device, dtype=weight.dtype)
    state_dict.pop(prefix + 'gate', None)
    state_dict.pop(prefix + 'unembed_gate', None)
    return state_dict


@contextlib.contextmanager
def folded_state_dict(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``state_dict()`` of ``model`` is that of the merged model."""
    handles = [
        m._register_state_dict_hook(_fold_hook)
        for m in model.modules()
        if isinstance(m, (GatedLinear, GatedEmbedding))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fold_gates_on_hf_export(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the merged model.

    Its state dict is gathered with the gates folded in; its config gets MPT's tied head
    gate as ``logit_scale``, or, for a Hugging Face tied head, ``tie_word_embeddings: false``.
    """
    get_hf_model = checkpointer._get_hf_model
    transform_config = checkpointer.transform_config

    def _get_hf_model(state):
        with folded_state_dict(state.model):
            return get_hf_model(state)

    def _transform_config(original_config):
        config = transform_config(original_config)
        embedding = next((m for m in model.modules() if isinstance(m, GatedEmbedding)), None)
        if embedding is not None and embedding.unembed_gate is not None:  # MPT tied head
            factor = (embedding.unembed_gate / (embedding.gate * embedding.output_scale)).item()
            config.logit_scale = (_numeric_logit_scale(unwrap(model)) or 1.0) * factor
        elif getattr(config, 'tie_word_embeddings', False):
            config.tie_word_embeddings = False  # e and p carry different gates
        return config

    checkpointer._get_hf_model = _get_hf_model
    checkpointer.transform_config = _transform_config


def _numeric_logit_scale(inner: nn.Module):
    return getattr(inner, 'logit_scale', None)
