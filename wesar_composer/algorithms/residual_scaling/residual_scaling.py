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
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.paper_init.paper_init import INIT_ATTR, INIT_MODES, apply_paper_init, init_matrix
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import check_bool, check_choice, check_optimizers, check_role_map
from wesar_composer.reparam.modules import Reparameterized
from wesar_composer.reparam.surgery import adopt, discover, is_meta, swap_modules
from wesar_composer.roles import BACKBONES, RESIDUAL_ROLES, unwrap

log = logging.getLogger(__name__)

__all__ = ['ResidualScaling', 'apply_residual_scaling', 'ResidualScaledLinear']

DEFAULT_BACKBONE = 'small'
METHOD = 'residual_scaling'


class ResidualScaledLinear(Reparameterized, nn.Linear):
    """``y = (x W^T + b) * residual_scale``: a residual writer (W_o, W_d) with the branch scale in its forward.

    ``residual_scale`` is a constant (1 / sqrt(2N)), kept as a plain attribute: the state dict
    has the keys of the plain ``nn.Linear``. ``reset_parameters`` draws W from the std paper_init
    recorded on the module (the backbone's, without 1/sqrt(2N)).
    """

    reparam_method = METHOD

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        residual_scale: float = 1.0,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.residual_scale = float(residual_scale)

    def reset_parameters(self) -> None:
        if hasattr(self, INIT_ATTR):
            init_matrix(self)
        else:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).mul_(self.residual_scale)  # in place: no second activation

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        folded = {'weight': tensors['weight'] * self.residual_scale}
        if tensors.get('bias') is not None:
            folded['bias'] = tensors['bias'] * self.residual_scale
        return folded

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, residual_scale={self.residual_scale:.4g}'


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
    shape, specs, _ = discover(model, METHOD, role_map, init_mode, INIT_MODES)
    residual = [s for s in specs if set(s.roles) <= set(RESIDUAL_ROLES)]
    if not residual:
        raise ValueError(
            f'No W_o or W_d of {type(unwrap(model)).__name__} matched a role; nothing to scale. '
            'Pass role_map={regex: role} naming its attention out-projection (o) and FFN down-projection (d).',
        )
    apply_paper_init(
        model,
        backbone=backbone,
        embedding_scaling=embedding_scaling,
        role_map=role_map,
        init_mode=init_mode,
        seed=seed,
    )
    factor = math.sqrt(2.0 * shape.n_layers)
    replacements = {}
    for spec in residual:
        old = spec.module
        new = ResidualScaledLinear(
            old.in_features, old.out_features, bias=old.bias is not None, device='meta', residual_scale=1.0 / factor
        )
        slice_sizes, stds, seed_of_matrix = getattr(old, INIT_ATTR)
        setattr(
            new, INIT_ATTR, (slice_sizes, tuple(std * factor for std in stds), seed_of_matrix)
        )  # paper_init draws it at materialization
        new.roles = spec.roles
        replacements[old] = adopt(new, old)
    swap_modules(model, replacements)
    for module in unwrap(model).modules():  # the model as a whole now carries residual scaling
        if getattr(module, 'reparam_method', '') == 'paper_init':
            module.reparam_method = METHOD
    with torch.no_grad():
        for module in replacements.values():
            if not is_meta(module):
                module.weight.mul_(factor)  # N(0, s^2 / 2N) -> N(0, s^2), the same draws
    log.info(
        'residual_scaling: %d residual writers scaled by 1/sqrt(2N) = %.4g in the forward (%s backbone).',
        len(replacements),
        1.0 / factor,
        backbone,
    )
    return model


class ResidualScaling(ReparamAlgorithm):
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

    method = METHOD
    init_modes = INIT_MODES

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

    def apply_to(self, model, optimizers, *, init_mode, seed):
        return apply_residual_scaling(
            model,
            optimizers=optimizers,
            backbone=self.backbone,
            embedding_scaling=self.embedding_scaling,
            role_map=self.role_map,
            init_mode=init_mode,
            seed=seed,
        )
