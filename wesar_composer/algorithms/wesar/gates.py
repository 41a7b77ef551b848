"""Reading gates (``gate_table``) and folding them into the weights (``merge_gates``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wesar_composer.algorithms.wesar.modules import GatedEmbedding, GatedLinear
from wesar_composer.reparam.fold import merge_reparameterization
from wesar_composer.roles import layer_index, unwrap

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


def merge_gates(model: nn.Module) -> nn.Module:
    """Fold every gate into its weight (W <- a * W) and remove the gates.

    The result is the plain model with the ungated state-dict keys and the same outputs:
    the embedding takes its output scaling into the weight; MPT's tied head keeps its own
    gate as ``logit_scale``; a Hugging Face tied head is untied. The same fold as
    :func:`~wesar_composer.merge_reparameterization`, which every method shares.
    """
    if not any(isinstance(m, (GatedLinear, GatedEmbedding)) for m in unwrap(model).modules()):
        raise ValueError(f'{type(unwrap(model)).__name__} has no WeSaR gates to merge.')
    return merge_reparameterization(model)
