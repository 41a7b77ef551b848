"""WeSaR: weight scaling as reparameterization (Nishida et al. 2024), as a Composer algorithm."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import ensure_tuple, module_surgery
from llmfoundry.callbacks import HuggingFaceCheckpointer
from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.wesar.gated_modules import GatedEmbedding, GatedLinear
from wesar_composer.algorithms.wesar.hf_export import fold_gates_on_hf_export
from wesar_composer.param_init import route_param_init_fn
from wesar_composer.roles import (
    BACKBONES,
    MatrixSpec,
    ModelShape,
    backbone_std,
    embedding_std,
    find_matrices,
    merged_role_map,
    model_shape,
    unwrap,
)

log = logging.getLogger(__name__)

__all__ = ['WeSaR', 'apply_wesar', 'GATED_MODULES']

DEFAULT_SIGMA_SQUARED = 4e-5  # Section 4.3: sigma^2 = 4e-5, the Small-init std of a d = 10,000 model
GATED_MODULES = (GatedLinear, GatedEmbedding)
ROUTE_TAG = 'wesar'


def check_hparams(
    sigma_squared: float,
    backbone: str,
    gate_weight_decay: float = 0.0,
    role_map: Optional[Mapping[str, str]] = None,
) -> float:
    """Validate the hyperparameters and return sigma."""
    if isinstance(sigma_squared, bool) or not isinstance(sigma_squared, (int, float)):
        raise ValueError(f'sigma_squared must be a positive finite number, got {sigma_squared!r}.')
    if not math.isfinite(sigma_squared) or sigma_squared <= 0:
        raise ValueError(f'sigma_squared must be a positive finite number, got {sigma_squared!r}.')
    if backbone not in BACKBONES:
        raise ValueError(f'backbone must be one of {BACKBONES}, got {backbone!r}.')
    if isinstance(gate_weight_decay, bool) or not isinstance(gate_weight_decay, (int, float)) or not (
        math.isfinite(gate_weight_decay) and gate_weight_decay >= 0
    ):
        raise ValueError(f'gate_weight_decay must be a finite number >= 0, got {gate_weight_decay!r}.')
    merged_role_map(role_map)  # raises on an unknown role or a bad regex
    return math.sqrt(sigma_squared)


def apply_wesar(
    model: nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]] = None,
    *,
    sigma_squared: float = DEFAULT_SIGMA_SQUARED,
    backbone: str = 'he',
    trainable_gates: bool = True,
    gate_weight_decay: float = 0.0,
    embedding_scaling: bool = True,
    role_map: Optional[Mapping[str, str]] = None,
) -> nn.Module:
    """Reparameterize every weight matrix W of ``model`` as a_r * W (Section 4.1).

    W ~ N(0, sigma^2) for every matrix; a_r starts at s_r / sigma, with s_r the backbone std
    of the matrix's role (Table 1). The token embedding keeps gate 1 and, with
    ``embedding_scaling``, its output is multiplied by 1 / sigma so that the residual stream
    starts at unit variance. Gates join the first optimizer in a param group of their own with
    ``gate_weight_decay``; ``trainable_gates=False`` freezes them (the paper's fixed-a ablation).

    Everything is validated before the model changes: a bad value raises ``ValueError`` and
    leaves the model as it was.
    """
    sigma = check_hparams(sigma_squared, backbone, gate_weight_decay, role_map)
    optimizers = ensure_tuple(optimizers) if optimizers is not None else ()
    if len(optimizers) > 1:
        raise ValueError(f'apply_wesar supports one optimizer, got {len(optimizers)}.')
    from wesar_composer.algorithms.reparam.common import applied_method  # imports this module

    applied = applied_method(model)
    if applied and applied[0] == 'wesar':
        raise ValueError(f'WeSaR is already applied to this model (gated modules such as {applied[1]!r}).')
    if applied:
        raise ValueError(
            f'{applied[0]} is already applied to this model ({applied[1]!r}); WeSaR replaces such a method '
            'rather than stacking on it: name one of them in algorithms.',
        )
    shape = model_shape(model)
    specs = find_matrices(model, role_map)
    if not specs:
        raise ValueError(
            f'No weight matrix of {type(unwrap(model)).__name__} matched a role; nothing to gate. '
            'Pass role_map={regex: role} naming its modules.',
        )

    replacements = {
        spec.module: _gated_module(spec, shape, sigma, backbone, trainable_gates, embedding_scaling, specs)
        for spec in specs
    }
    module_surgery.replace_module_classes(
        unwrap(model),
        policies={nn.Linear: lambda m, _: replacements.get(m), nn.Embedding: lambda m, _: replacements.get(m)},
    )
    for replacement in replacements.values():
        if not replacement.weight.is_meta:  # a meta model is initialized when Composer materializes it
            replacement.reset_parameters()
    _route_param_init_fn(model)
    gates = [m.gate for m in replacements.values()]
    gates += [m.unembed_gate for m in replacements.values() if getattr(m, 'unembed_gate', None) is not None]
    if trainable_gates and optimizers:
        _add_gate_group(optimizers[0], gates, gate_weight_decay)
    log.info('WeSaR gated %d matrices (sigma^2=%g, backbone=%s).', len(specs), sigma_squared, backbone)
    return model


def _gated_module(
    spec: MatrixSpec,
    shape: ModelShape,
    sigma: float,
    backbone: str,
    trainable: bool,
    embedding_scaling: bool,
    specs: list[MatrixSpec],
) -> nn.Module:
    old = spec.module
    if spec.is_embedding:
        unembed_gate = None
        if shape.tied_embeddings and not any(s.roles == ('p',) for s in specs):
            unembed_gate = backbone_std('p', old.embedding_dim, shape, backbone) / sigma  # tied head (MPT)
        new = GatedEmbedding(
            old.num_embeddings,
            old.embedding_dim,
            old.padding_idx,
            device='meta',
            gate_init=1.0 if embedding_scaling else embedding_std(shape, backbone) / sigma,
            unembed_gate_init=unembed_gate,
            output_scale=1.0 / sigma if embedding_scaling else 1.0,
            weight_std=sigma,
            trainable_gate=trainable,
        )
    else:
        gate_init = [backbone_std(role, spec.d_in, shape, backbone) / sigma for role in spec.roles]
        new = GatedLinear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device='meta',
            gate_init=gate_init,
            slice_sizes=spec.slice_sizes,
            weight_std=sigma,
            trainable_gate=trainable,
        )
        new.bias = old.bias
    new.roles = spec.roles + (('p',) if new_is_tied_embedding(new) else ())
    new.plain_class = type(old)  # what merge_gates turns it back into
    new.weight = old.weight  # the same Parameter: optimizer state and weight tying stay intact
    for attr in ('_fused', '_is_residual', '_fsdp_wrap'):  # llm-foundry's markers for init and FSDP
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    for name, gate in list(new.named_parameters(recurse=False)):
        if 'gate' in name:  # gates live beside the weight; values are set by reset_parameters
            empty = torch.empty(gate.shape, device=old.weight.device, dtype=old.weight.dtype)
            setattr(new, name, nn.Parameter(empty, requires_grad=trainable))
    return new


def new_is_tied_embedding(module: nn.Module) -> bool:
    return isinstance(module, GatedEmbedding) and module.unembed_gate is not None


def _route_param_init_fn(model: nn.Module) -> None:
    """Make every ``param_init_fn`` (llm-foundry's MPT has one) initialize gated modules the WeSaR way.

    Composer calls ``obj.param_init_fn(module)`` on each module when it materializes a meta
    model under FSDP; gated modules then get ``reset_parameters`` (W ~ N(0, sigma^2), a = s_r / sigma).
    """
    route_param_init_fn(model, _reset_gated, ROUTE_TAG)


def _reset_gated(module: nn.Module) -> bool:
    if not isinstance(module, GATED_MODULES):
        return False
    module.reset_parameters()
    return True


def _add_gate_group(optimizer: Optimizer, gates: list[nn.Parameter], weight_decay: float) -> None:
    """Gates get a param group of their own: the first group's settings, their own weight decay."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != 'params'}
    group.update(params=gates, weight_decay=weight_decay)
    optimizer.add_param_group(group)


class WeSaR(Algorithm):
    """Composer algorithm for WeSaR: runs :func:`apply_wesar` at ``Event.INIT``.

    An llm-foundry ``hf_checkpointer`` in the same run exports the merged model (gates folded
    into the weights), which loads with plain ``transformers``.

    YAML: ``algorithms: {wesar: {sigma_squared: 4.0e-5, backbone: he}}``.

    Args:
        sigma_squared: variance of every actual weight matrix (default 4e-5).
        backbone: ``'he'`` (paper default) or ``'small'``: which Table 1 stds the gates carry.
        trainable_gates: ``False`` freezes the gates (the fixed-a ablation of Table 7).
        gate_weight_decay: weight decay of the gate param group (default 0, no decay).
        embedding_scaling: multiply the embedding output by 1 / sigma (default on).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
    """

    def __init__(
        self,
        sigma_squared: float = DEFAULT_SIGMA_SQUARED,
        backbone: str = 'he',
        trainable_gates: bool = True,
        gate_weight_decay: float = 0.0,
        embedding_scaling: bool = True,
        role_map: Optional[Mapping[str, str]] = None,
    ):
        check_hparams(sigma_squared, backbone, gate_weight_decay, role_map)
        self.sigma_squared = sigma_squared
        self.backbone = backbone
        self.trainable_gates = trainable_gates
        self.gate_weight_decay = gate_weight_decay
        self.embedding_scaling = embedding_scaling
        self.role_map = dict(role_map) if role_map else None

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(sigma_squared={self.sigma_squared}, backbone={self.backbone!r}, '
            f'trainable_gates={self.trainable_gates}, gate_weight_decay={self.gate_weight_decay}, '
            f'embedding_scaling={self.embedding_scaling}, role_map={self.role_map})'
        )

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        apply_wesar(
            state.model,
            optimizers=state.optimizers,
            sigma_squared=self.sigma_squared,
            backbone=self.backbone,
            trainable_gates=self.trainable_gates,
            gate_weight_decay=self.gate_weight_decay,
            embedding_scaling=self.embedding_scaling,
            role_map=self.role_map,
        )
        for callback in state.callbacks:
            if isinstance(callback, HuggingFaceCheckpointer):
                fold_gates_on_hf_export(callback, state.model)
