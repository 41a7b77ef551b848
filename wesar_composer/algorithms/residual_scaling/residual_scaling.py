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

import dataclasses
import logging
import math

import torch
from torch import nn

from wesar_composer.algorithms.paper_init import PaperInitConfig
from wesar_composer.algorithms.paper_init.paper_init import apply_paper_init_config
from wesar_composer.algorithms.residual_scaling.modules import METHOD, ResidualScaledLinear
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import Optimizers, check_optimizers
from wesar_composer.reparam.init import MatrixInit
from wesar_composer.reparam.surgery import adopt, discover, is_meta, swap_modules
from wesar_composer.roles import RESIDUAL_ROLES, unwrap

log = logging.getLogger(__name__)

__all__ = ['ResidualScaling', 'ResidualScalingConfig', 'apply_residual_scaling']


@dataclasses.dataclass(frozen=True)
class ResidualScalingConfig(PaperInitConfig):
    """residual_scaling's hyperparameters: paper_init's, without the per-matrix learning rates.

    Args:
        backbone: ``'small'`` or ``'he'``: the Table 1 stds, W_o and W_d without 1/sqrt(2N).
        embedding_scaling: multiply the embedding output by 1 / std(W_e) (default on, as in the paper).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
    """

    method = METHOD

    @classmethod
    def names(cls) -> list[str]:
        return [n for n in super().names() if n != 'matrix_lr_sigma_squared']


def apply_residual_scaling(
    model: nn.Module, optimizers: Optimizers = None, *, seed: int | None = None, **hparams
) -> nn.Module:
    """Move the 1/sqrt(2N) of W_o and W_d from their init into the forward pass (Appendix C.3).

    ``hparams`` are :class:`ResidualScalingConfig`'s fields (``backbone``, ``embedding_scaling``,
    ``role_map``, ``init_mode``). Applies paper_init with them, then makes every W_o and W_d a
    :class:`ResidualScaledLinear` sharing its weight ``Parameter``, with output scale
    1/sqrt(2N) and W drawn without the 1/sqrt(2N) (for a model already materialized, its
    paper_init weights are multiplied by sqrt(2N), so the function is unchanged). Nothing joins
    the optimizer. ``init_mode`` and ``seed`` are paper_init's. Everything is validated before
    the model changes.
    """
    config = ResidualScalingConfig.from_kwargs(**hparams)
    check_optimizers(METHOD, optimizers)
    shape, specs, _ = discover(model, METHOD, config.role_map, config.init_mode, config.init_modes)
    residual = [s for s in specs if set(s.roles) <= set(RESIDUAL_ROLES)]
    if not residual:
        raise ValueError(
            f'No W_o or W_d of {type(unwrap(model)).__name__} matched a role; nothing to scale. '
            'Pass role_map={regex: role} naming its attention out-projection (o) and FFN down-projection (d).',
        )
    apply_paper_init_config(model, None, config, seed, method=METHOD)
    factor = math.sqrt(2.0 * shape.n_layers)
    replacements = {}
    for spec in residual:
        old = spec.module
        new = ResidualScaledLinear(
            old.in_features, old.out_features, bias=old.bias is not None, device='meta', residual_scale=1.0 / factor
        )
        matrix_init = MatrixInit.of(old)
        assert matrix_init is not None
        matrix_init.scaled(factor).mark(new)  # drawn without 1/sqrt(2N) when a meta model is materialized
        new.roles = spec.roles
        replacements[old] = adopt(new, old)
    swap_modules(model, replacements)
    with torch.no_grad():
        for module in replacements.values():
            if not is_meta(module):
                module.weight.mul_(factor)  # N(0, s^2 / 2N) -> N(0, s^2), the same draws
    log.info(
        'residual_scaling: %d residual writers scaled by 1/sqrt(2N) = %.4g in the forward (%s backbone).',
        len(replacements),
        1.0 / factor,
        config.backbone,
    )
    return model


class ResidualScaling(ReparamAlgorithm):
    """Composer algorithm for residual scaling as reparameterization: :func:`apply_residual_scaling` at ``Event.INIT``.

    YAML: ``algorithms: {residual_scaling: {backbone: small}}`` (Table 6 "w/ Small") or
    ``{backbone: he}`` ("w/ He"); the hyperparameters are :class:`ResidualScalingConfig`'s. Do
    not add ``paper_init``: this algorithm applies it. An llm-foundry ``hf_checkpointer`` in the
    same run exports the merged model (1/sqrt(2N) folded into W_o and W_d, embedding scaling
    into W_e).
    """

    config_class = ResidualScalingConfig
    apply_function = apply_residual_scaling
