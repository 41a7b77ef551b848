"""Residual scaling as reparameterization (Noci et al. 2022), one of the paper's compared methods.

Table 4: W_o and W_d only, not trainable, no normalization, scaled by matrix. The residual
connection becomes y = f(LN(x)) / sqrt(2N) + x (Appendix C.3): the 1/sqrt(2N) that Small and He
init put into the stds of W_o and W_d moves into the forward pass, where it multiplies the
output of the two matrices that write into the residual stream (by linearity, the same as
scaling the branch). Their init then drops the 1/sqrt(2N):

    backbone  W_o                 W_d                  every other matrix
    small     N(0, 2/(5d))        N(0, 2/(5d))         N(0, 2/(5d))
    he        N(0, 1/d)           N(0, 2/(4d))         N(0, 1/d_in)

with embedding scaling, as paper_init (which this algorithm applies first). At initialization
the model computes exactly the function of paper_init with the same backbone.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from llmfoundry.callbacks import HuggingFaceCheckpointer
from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.paper_init.paper_init import INIT_ATTR, INIT_MODES, apply_paper_init, init_matrix
from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding
from wesar_composer.algorithms.reparam.common import REPARAMETERIZED, check_unreparameterized, swap_modules
from wesar_composer.algorithms.reparam.fold import fold_reparam_on_hf_export
from wesar_composer.param_init import is_meta
from wesar_composer.reparam.checks import (
    CheckedHparams,
    check_bool,
    check_choice,
    check_optimizers,
    check_role_map,
)
from wesar_composer.reparam.pretrained import resolve_init_mode
from wesar_composer.reparam.trainer import check_loaded_checkpoint, guard_checkpoints, run_init_mode
from wesar_composer.roles import BACKBONES, RESIDUAL_ROLES, check_complete, find_matrices, model_shape, unwrap

log = logging.getLogger(__name__)

__all__ = ['ResidualScaling', 'apply_residual_scaling', 'ResidualScaledLinear']

DEFAULT_BACKBONE = 'small'
METHOD = 'residual_scaling'


class ResidualScaledLinear(nn.Linear):
    """``y = (x W^T + b) * residual_scale``: a residual writer (W_o, W_d) with the branch scale in its forward.

    ``residual_scale`` is a constant (1 / sqrt(2N)), kept as a plain attribute: the state dict
    has the keys of the plain ``nn.Linear``. ``reset_parameters`` draws W from the std paper_init
    recorded on the module (the backbone's, without 1/sqrt(2N)).
    """

    FOLDED_KEYS = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 residual_scale: float = 1.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.residual_scale = float(residual_scale)

    def reset_parameters(self) -> None:
        if hasattr(self, INIT_ATTR):
            init_matrix(self)
        else:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.residual_scale

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        folded = {'weight': tensors['weight'] * self.residual_scale}
        if tensors.get('bias') is not None:
            folded['bias'] = tensors['bias'] * self.residual_scale
        return folded

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, residual_scale={self.residual_scale:.4g}'


REPARAMETERIZED[ResidualScaledLinear] = METHOD


def check_hparams(backbone, embedding_scaling, role_map, init_mode) -> None:
    check_choice('backbone', backbone, BACKBONES)
    check_bool('embedding_scaling', embedding_scaling)
    check_role_map(role_map)
    check_choice('init_mode', init_mode, INIT_MODES)


def apply_residual_scaling(
    model: nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]] = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    embedding_scaling: bool = True,
    role_map: Optional[Mapping[str, str]] = None,
    init_mode: str = 'auto',
    seed: Optional[int] = None,
) -> nn.Module:
    """Move the 1/sqrt(2N) of W_o and W_d from their init into the forward pass (Appendix C.3).

    Applies paper_init (``backbone``, ``embedding_scaling``), then makes every W_o and W_d a
    :class:`ResidualScaledLinear` sharing its weight ``Parameter``, with output scale
    1/sqrt(2N) and W drawn without the 1/sqrt(2N) (for a model already materialized, its
    paper_init weights are multiplied by sqrt(2N), so the function is unchanged). Nothing joins
    the optimizer. ``init_mode`` and ``seed`` are paper_init's. Everything is validated before
    the model changes.
    """
    check_hparams(backbone, embedding_scaling, role_map, init_mode)
    check_optimizers(METHOD, optimizers)
    check_unreparameterized(model, METHOD)
    shape = model_shape(model)
    specs = find_matrices(model, role_map)
    check_complete(model, specs, METHOD, role_map)
    residual = [s for s in specs if set(s.roles) <= set(RESIDUAL_ROLES)]
    if not residual:
        raise ValueError(
            f'No W_o or W_d of {type(unwrap(model)).__name__} matched a role; nothing to scale. '
            'Pass role_map={regex: role} naming its attention out-projection (o) and FFN down-projection (d).',
        )
    resolve_init_mode(METHOD, init_mode, model, INIT_MODES)
    embedding_class = next((type(s.module) for s in specs if s.is_embedding), None)

    apply_paper_init(
        model, backbone=backbone, embedding_scaling=embedding_scaling, role_map=role_map, init_mode=init_mode, seed=seed,
    )
    if embedding_class is not None:
        for module in unwrap(model).modules():
            if isinstance(module, ScaledEmbedding):
                module.plain_class = embedding_class  # what merge_reparameterization turns it back into
    factor = math.sqrt(2.0 * shape.n_layers)
    replacements = {}
    for spec in residual:
        old = spec.module
        new = ResidualScaledLinear(old.in_features, old.out_features, bias=old.bias is not None, device='meta',
                                   residual_scale=1.0 / factor)
        new.weight = old.weight  # the same Parameter: optimizer state stays intact
        new.bias = old.bias
        slice_sizes, stds, seed_of_matrix = getattr(old, INIT_ATTR)
        setattr(new, INIT_ATTR, (slice_sizes, tuple(std * factor for std in stds), seed_of_matrix))  # paper_init draws it at materialization
        new.roles = spec.roles
        new.plain_class = type(old)
        replacements[old] = new
    swap_modules(model, replacements)
    with torch.no_grad():
        for module in replacements.values():
            if not is_meta(module):
                module.weight.mul_(factor)  # N(0, s^2 / 2N) -> N(0, s^2), the same draws
    log.info('residual_scaling: %d residual writers scaled by 1/sqrt(2N) = %.4g in the forward (%s backbone).',
             len(replacements), 1.0 / factor, backbone)
    return model


class ResidualScaling(CheckedHparams, Algorithm):
    """Composer algorithm for residual scaling as reparameterization: :func:`apply_residual_scaling` at ``Event.INIT``.

    YAML: ``algorithms: {residual_scaling: {backbone: small}}`` (Table 6 "w/ Small") or
    ``{backbone: he}`` ("w/ He"). Do not add ``paper_init``: this algorithm applies it. An
    llm-foundry ``hf_checkpointer`` in the same run exports the merged model (1/sqrt(2N) folded
    into W_o and W_d, embedding scaling into W_e).

    Args:
        backbone: ``'small'`` or ``'he'``: the Table 1 stds, W_o and W_d without 1/sqrt(2N).
        embedding_scaling: multiply the embedding output by 1 / std(W_e) (default on, as in the paper).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        embedding_scaling: bool = True,
        role_map: Optional[Mapping[str, str]] = None,
        init_mode: str = 'auto',
    ):
        check_hparams(backbone, embedding_scaling, role_map, init_mode)
        self.backbone = backbone
        self.embedding_scaling = embedding_scaling
        self.role_map = dict(role_map) if role_map else None
        self.init_mode = init_mode

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(backbone={self.backbone!r}, embedding_scaling={self.embedding_scaling}, '
            f'role_map={self.role_map}, init_mode={self.init_mode!r})'
        )

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOAD:
            check_loaded_checkpoint(state)
            return
        apply_residual_scaling(
            state.model,
            optimizers=state.optimizers,
            backbone=self.backbone,
            embedding_scaling=self.embedding_scaling,
            role_map=self.role_map,
            init_mode=run_init_mode(state, METHOD, self.init_mode, INIT_MODES),
            seed=state.rank_zero_seed,
        )
        guard_checkpoints(state)
        for callback in state.callbacks:
            if isinstance(callback, HuggingFaceCheckpointer):
                fold_reparam_on_hf_export(callback, state.model)
