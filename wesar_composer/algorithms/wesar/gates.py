"""Reading gates (``gate_table``) and folding them into the weights (``merge_gates``)."""

from __future__ import annotations

from typing import Any

import torch
from composer.utils import module_surgery
from torch import nn

from wesar_composer.algorithms.wesar.gated_modules import GatedEmbedding, GatedLinear
from wesar_composer.roles import find_config, layer_index, unwrap

__all__ = ['gate_table', 'merge_gates']


@torch.no_grad()
def gate_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per gated matrix (one per q/k/v slice of a fused projection).

    Keys: ``name``, ``role``, ``layer`` (None for e and p), ``gate``, ``weight_std`` (std of
    the actual W), ``virtual_std`` (std of a * W, without the embedding's output scaling).
    """
    rows = []
    for name, module in unwrap(model).named_modules():
        if isinstance(module, GatedLinear):
            slices = module.weight.split(list(module.slice_sizes))
            for role, gate, weight in zip(module.roles, module.gate, slices):
                rows.append(_row(name if len(slices) == 1 else f'{name}[{role}]', role, gate, weight))
        elif isinstance(module, GatedEmbedding):
            rows.append(_row(name, 'e', module.gate[0], module.weight))
            if module.unembed_gate is not None:
                rows.append(_row(f'{name}[p]', 'p', module.unembed_gate[0], module.weight))
    return rows


def _row(name: str, role: str, gate: torch.Tensor, weight: torch.Tensor) -> dict[str, Any]:
    weight_std = weight.float().std().item()
    gate_value = gate.item()
    return {
        'name': name,
        'role': role,
        'layer': layer_index(name, role),
        'gate': gate_value,
        'weight_std': weight_std,
        'virtual_std': abs(gate_value) * weight_std,
    }


@torch.no_grad()
def merge_gates(model: nn.Module) -> nn.Module:
    """Fold every gate into its weight (W <- a * W) and remove the gates.

    The result is the plain model with the ungated state-dict keys and the same outputs:
    the embedding takes its output scaling into the weight; MPT's tied head keeps its own
    gate as ``logit_scale``; a Hugging Face tied head is untied.
    """
    inner = unwrap(model)
    gated = {m for m in inner.modules() if isinstance(m, (GatedLinear, GatedEmbedding))}
    if not gated:
        raise ValueError(f'{type(inner).__name__} has no WeSaR gates to merge.')
    tied_logit_factor = None
    merged: dict[nn.Module, nn.Module] = {}
    for module in gated:
        if isinstance(module, GatedLinear):
            plain = module.plain_class(module.in_features, module.out_features, bias=module.bias is not None, device='meta')
            plain.weight = nn.Parameter(module.virtual_weight().detach().clone())
            plain.bias = module.bias
        else:
            plain = module.plain_class(module.num_embeddings, module.embedding_dim, module.padding_idx, device='meta')
            embed_scale = module.gate[0] * module.output_scale
            plain.weight = nn.Parameter((module.weight * embed_scale).detach().clone())
            if module.unembed_gate is not None:
                tied_logit_factor = (module.unembed_gate[0] / embed_scale).item()
        for attr in ('_fused', '_is_residual', '_fsdp_wrap'):
            if hasattr(module, attr):
                setattr(plain, attr, getattr(module, attr))
        merged[module] = plain

    module_surgery.replace_module_classes(
        inner,
        policies={GatedLinear: lambda m, _: merged.get(m), GatedEmbedding: lambda m, _: merged.get(m)},
    )
    config = find_config(model)
    if tied_logit_factor is not None:
        _fold_into_logit_scale(inner, config, tied_logit_factor)
    elif config is not None and getattr(config, 'tie_word_embeddings', False):
        config.tie_word_embeddings = False  # e and p had different gates: their merged weights differ
    return model


def _fold_into_logit_scale(inner: nn.Module, config, factor: float) -> None:
    """MPT tied head: logits = h (a_p W)^T = h W'^T * a_p / (a_e / sigma), with W' = a_e W / sigma."""
    owners = [m for m in inner.modules() if hasattr(m, 'logit_scale') and isinstance(m, nn.Module)]
    if not owners:
        raise ValueError('Tied embeddings with separate e and p gates need a model with `logit_scale` (MPT) to merge.')
    for owner in owners:
        owner.logit_scale = (owner.logit_scale or 1.0) * factor
    if config is not None:
        config.logit_scale = owners[0].logit_scale
