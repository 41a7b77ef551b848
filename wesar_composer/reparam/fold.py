"""Fold-back for inference and export: a reparameterized model becomes the plain model with the same outputs.

One path for every method. Each :class:`~wesar_composer.reparam.modules.Reparameterized` module
turns its own state-dict tensors into the weight (and bias) of the plain class it replaced
(``fold_tensors``), names the keys to drop (``FOLDED_KEYS``) and, for a token embedding that is
also the prediction head (MPT's tied ``wte``), says how much its head differs from the folded
embedding (``unembed_factor``). A tied MPT head keeps that factor as ``logit_scale``; a tied
Hugging Face head is untied (its weight differs from the folded embedding).

- :func:`merge_reparameterization` swaps the modules for plain ones in place.
- :func:`export_merged` makes an llm-foundry ``hf_checkpointer`` write the merged model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional, cast

import torch
from composer.utils import module_surgery
from torch import nn

from wesar_composer.reparam.modules import Reparameterized
from wesar_composer.reparam.surgery import copy_markers
from wesar_composer.roles import find_config, unwrap

__all__ = ['merge_reparameterization', 'reparameterized_modules', 'export_merged']


def reparameterized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in unwrap(model).modules() if isinstance(m, Reparameterized)]


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    return tensors


def logit_scale_owners(model: nn.Module) -> list[nn.Module]:
    """Modules holding MPT's ``logit_scale`` (a tied MPT head multiplies its logits by it)."""
    return [m for m in unwrap(model).modules() if 'logit_scale' in vars(m)]


def _is_tied(model: nn.Module) -> bool:
    return bool(getattr(find_config(model), 'tie_word_embeddings', False))


@torch.no_grad()
def merge_reparameterization(model: nn.Module) -> nn.Module:
    """Fold every reparameterization of this package (and embedding scaling) into plain weights.

    The reparameterized modules become the plain classes they replaced (``nn.Linear``,
    llm-foundry's ``SharedEmbedding``) with the weights the model computes with at this point in
    training, and the state-dict keys of the plain model. The outputs do not change (in eval
    mode: sigma-Reparam folds its current spectral-norm estimate). Returns the model.
    """
    inner = unwrap(model)
    modules = reparameterized_modules(model)
    if not modules:
        raise ValueError(f'{type(inner).__name__} has no reparameterized modules of this package to merge.')
    tied, owners = _is_tied(model), logit_scale_owners(model)
    head_factor = None
    merged: dict[nn.Module, nn.Module] = {}
    for module in modules:
        tensors = _own_tensors(module)
        folded = module.fold_tensors(tensors)
        if isinstance(module, nn.Embedding):
            plain = module.plain_class(module.num_embeddings, module.embedding_dim, module.padding_idx, device='meta')
            if tied and owners:
                head_factor = module.unembed_factor(tensors)
        else:
            plain = module.plain_class(
                module.in_features, module.out_features, bias=module.bias is not None, device='meta'
            )
            if module.bias is not None:
                plain.bias = nn.Parameter(folded.get('bias', module.bias).detach().clone())
        plain.weight = nn.Parameter(folded['weight'].detach().clone())
        copy_markers(module, plain)
        merged[module] = plain
    policies = {cls: (lambda m, _: merged.get(m)) for cls in {type(m) for m in modules}}
    module_surgery.replace_module_classes(inner, policies=policies)
    config = find_config(model)
    if head_factor is not None:
        for owner in owners:
            owner.logit_scale = (owner.logit_scale or 1.0) * head_factor
        if config is not None:
            config.logit_scale = owners[0].logit_scale
    elif tied and config is not None:
        config.tie_word_embeddings = False  # the head keeps its own weight, which now differs from W_e
    return model


def _fold_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    """State-dict hook: the module's entries become the plain module's (active only during an export)."""
    local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and '.' not in k[len(prefix) :]}
    if not isinstance(local.get('weight'), torch.Tensor):
        return state_dict  # not on this rank (an FSDP full state dict lives on rank 0)
    with torch.no_grad():
        for key, value in module.fold_tensors(local).items():
            state_dict[prefix + key] = value.to(dtype=local[key].dtype)
        if isinstance(module, nn.Embedding):
            try:
                module._export_unembed_factor = float(module.unembed_factor(local))
            except (KeyError, NotImplementedError):
                module._export_unembed_factor = None  # not a tied head
    for key in cast(Reparameterized, module).FOLDED_KEYS:
        state_dict.pop(prefix + key, None)
    return state_dict


@contextlib.contextmanager
def _folding(model: nn.Module) -> Iterator[None]:
    handles = [m._register_state_dict_hook(_fold_hook) for m in reparameterized_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def export_merged(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the merged model.

    llm-foundry builds a plain model from the config and loads the gathered state dict into it
    (its ``_get_hf_model``); the state dict is folded on the way out, and the exported config
    gets a tied MPT head's factor in ``logit_scale``, or ``tie_word_embeddings: false`` for a
    tied Hugging Face head. Composer's own checkpoints keep the reparameterized tensors.
    Idempotent: a checkpointer is wrapped once.
    """
    if getattr(checkpointer, '_wesar_composer_export', False):
        return
    get_hf_model = checkpointer._get_hf_model
    transform_config = checkpointer.transform_config

    def _get_hf_model(state):
        with _folding(state.model):
            return get_hf_model(state)

    def _transform_config(original_config):
        return _edit_config(transform_config(original_config), model)

    checkpointer._get_hf_model = _get_hf_model
    checkpointer.transform_config = _transform_config
    checkpointer._wesar_composer_export = True


def _edit_config(config, model: nn.Module):
    if not getattr(config, 'tie_word_embeddings', False):
        return config
    embedding = next((m for m in reparameterized_modules(model) if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        return config
    factor: Optional[float] = getattr(embedding, '_export_unembed_factor', None)
    if hasattr(config, 'logit_scale') and factor is not None:  # MPT: the head is the embedding (unembed=True)
        current = getattr(unwrap(model), 'logit_scale', None)
        config.logit_scale = (current if isinstance(current, (int, float)) else 1.0) * factor
    else:
        config.tie_word_embeddings = False
    return config
