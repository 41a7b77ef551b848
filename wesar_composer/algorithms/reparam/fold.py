"""Fold-back for inference: a reparameterized model becomes the plain model with the same outputs.

Each reparameterized module of this package knows how to turn its own state-dict tensors into
the weight (and bias) a plain ``nn.Linear`` / ``SharedEmbedding`` would carry
(``fold_tensors``), which keys to drop (``FOLDED_KEYS``), and, for a token embedding that is
also the prediction head (MPT's tied ``wte``), by how much its head differs from the folded
embedding (``unembed_factor``). paper_init's ``ScaledEmbedding`` (used by residual scaling)
folds its output scale into W_e the same way.

- :func:`merge_reparameterization` swaps the modules for plain ones in place.
- :func:`folded_state_dict` makes ``state_dict()`` return the merged model's tensors.
- :func:`fold_reparam_on_hf_export` makes an llm-foundry ``hf_checkpointer`` write the merged model.

A tied MPT head keeps its own factor as ``logit_scale``; a Hugging Face tied head is untied.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch
from composer.utils import module_surgery
from llmfoundry.models.layers.custom_embedding import SharedEmbedding
from torch import nn

from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding
from wesar_composer.algorithms.reparam.common import LLMFOUNDRY_MARKERS, REPARAMETERIZED
from wesar_composer.hf_export import fold_on_hf_export, state_dict_hooks
from wesar_composer.roles import find_config, unwrap

__all__ = ['merge_reparameterization', 'folded_state_dict', 'fold_reparam_on_hf_export', 'foldable_modules']


def _foldable_types() -> tuple[type, ...]:
    return (*REPARAMETERIZED, ScaledEmbedding)


def _is_foldable(module: nn.Module) -> bool:
    return isinstance(module, _foldable_types())


def foldable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unwrap(model).named_modules() if _is_foldable(m)]


def _fold_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(module, ScaledEmbedding):
        return {'weight': tensors['weight'] * module.output_scale}
    return module.fold_tensors(tensors)


def _unembed_factor(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> float:
    """Head weight / folded embedding weight of an embedding that is also the head (a scalar)."""
    if isinstance(module, ScaledEmbedding):
        return 1.0 / module.output_scale
    return module.unembed_factor(tensors)


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    return tensors


def _ties_head_to_embedding(model: nn.Module) -> tuple[bool, list[nn.Module]]:
    """(tied?, modules with MPT's ``logit_scale``): a tied MPT folds into logit_scale, a tied HF head is untied."""
    config = find_config(model)
    tied = bool(getattr(config, 'tie_word_embeddings', False))
    owners = [m for m in unwrap(model).modules() if 'logit_scale' in vars(m)]
    return tied, owners


@torch.no_grad()
def merge_reparameterization(model: nn.Module) -> nn.Module:
    """Fold weight norm, sigma-Reparam or residual scaling (and embedding scaling) into plain weights.

    The reparameterized modules become the plain classes they replaced (``nn.Linear``,
    llm-foundry's ``SharedEmbedding``) with the weights the model computed with at this point
    in training, and the state-dict keys of the plain model. The outputs do not change (in eval
    mode: sigma-Reparam folds its current spectral-norm estimate). Returns the model.
    """
    inner = unwrap(model)
    modules = foldable_modules(model)
    if not modules:
        raise ValueError(
            f'{type(inner).__name__} has no weight_norm, sigma_reparam or residual_scaling modules to merge '
            '(for WeSaR use merge_gates).',
        )
    tied, owners = _ties_head_to_embedding(model)
    head_factor = None
    merged: dict[nn.Module, nn.Module] = {}
    for _, module in modules:
        tensors = _own_tensors(module)
        folded = _fold_tensors(module, tensors)
        if isinstance(module, nn.Embedding):
            plain_class = getattr(module, 'plain_class', SharedEmbedding)
            plain = plain_class(module.num_embeddings, module.embedding_dim, module.padding_idx, device='meta')
            if tied and owners:
                head_factor = _unembed_factor(module, tensors)
        else:
            plain = module.plain_class(module.in_features, module.out_features, bias=module.bias is not None, device='meta')
            if module.bias is not None:
                plain.bias = nn.Parameter(folded.get('bias', module.bias).detach().clone())
        plain.weight = nn.Parameter(folded['weight'].detach().clone())
        for attr in LLMFOUNDRY_MARKERS:
            if hasattr(module, attr):
                setattr(plain, attr, getattr(module, attr))
        merged[module] = plain

    policies = {cls: (lambda m, _: merged.get(m)) for cls in (nn.Linear, nn.Embedding)}
    module_surgery.replace_module_classes(inner, policies=policies)
    config = find_config(model)
    if head_factor is not None:
        _scale_logits(owners, config, head_factor)
    elif tied and config is not None:
        config.tie_word_embeddings = False  # the head keeps its own weight, which now differs from W_e
    return model


def _scale_logits(owners: list[nn.Module], config, factor: float) -> None:
    for owner in owners:
        owner.logit_scale = (owner.logit_scale or 1.0) * factor
    if config is not None:
        config.logit_scale = owners[0].logit_scale


def _fold_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> dict[str, Any]:
    local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and '.' not in k[len(prefix):]}
    if not isinstance(local.get('weight'), torch.Tensor):
        return state_dict
    with torch.no_grad():
        folded = _fold_tensors(module, local)
        for key, value in folded.items():
            state_dict[prefix + key] = value.to(dtype=local[key].dtype)
        if isinstance(module, nn.Embedding):
            module._export_unembed_factor = float(_unembed_factor(module, local))
    for key in getattr(module, 'FOLDED_KEYS', ()):
        state_dict.pop(prefix + key, None)
    return state_dict


@contextlib.contextmanager
def folded_state_dict(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``state_dict()`` of ``model`` holds the merged model's tensors and keys."""
    with state_dict_hooks(model, _foldable_types(), _fold_hook):
        yield


def fold_reparam_on_hf_export(checkpointer: Any, model: nn.Module) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the merged model.

    The gathered state dict is folded on the way out; the exported config gets a tied MPT
    head's factor in ``logit_scale``, or ``tie_word_embeddings: false`` for a Hugging Face tied
    head. Composer's own checkpoints keep the reparameterized tensors.
    """

    def edit_config(config):
        if not getattr(config, 'tie_word_embeddings', False):
            return config
        embedding = next((m for _, m in foldable_modules(model) if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            return config
        factor: Optional[float] = getattr(embedding, '_export_unembed_factor', None)
        if hasattr(config, 'logit_scale') and factor is not None:  # MPT: the head is the embedding (unembed=True)
            current = getattr(unwrap(model), 'logit_scale', None)
            config.logit_scale = (current if isinstance(current, (int, float)) else 1.0) * factor
        else:
            config.tie_word_embeddings = False
        return config

    fold_on_hf_export(checkpointer, _foldable_types(), _fold_hook, edit_config)
