"""The paper's baseline initializations (Table 1) with embedding scaling, as a Composer algorithm.

Small init (Nguyen and Salazar 2019):  W ~ N(0, 2 / (5d)) for every matrix.
He init (He et al. 2015):              W ~ N(0, gain^2 / d_in), gain sqrt(2) for W_d, else 1.
Both:                                  W_o and W_d (residual writers) divided by sqrt(2N);
                                       embedding output multiplied by 1 / std(W_e).
Optional (``matrix_lr_sigma_squared``): each matrix's learning rate multiplied by s_r / sigma.
                                       Under Adam this is the step WeSaR with fixed gates
                                       a_r = s_r / sigma takes on a_r W, with no gate to compute.

These are the stds WeSaR's virtual parameters a_r * W start from (same role discovery, same
``backbone_std``), carried here by the weights themselves with no gates: the paper's
"Small Init." baseline and its "He Init." ablation (Tables 5 and 7). llm-foundry's own
``small_init_`` has no embedding scaling and its kaiming init gives W_d no gain of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.paper_init.modules import METHOD, ScaledEmbedding
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import Optimizers, check_bool, check_choice, check_optimizers, check_positive
from wesar_composer.reparam.config import ReparamConfig
from wesar_composer.reparam.init import MatrixInit, draw_base_seed, init_matrix, matrix_seed
from wesar_composer.reparam.surgery import adopt, discover, is_meta, route_param_init_fn, swap_modules
from wesar_composer.roles import BACKBONES, MatrixSpec, backbone_std, embedding_std

log = logging.getLogger(__name__)

__all__ = ['PaperInit', 'PaperInitConfig', 'apply_paper_init']

DEFAULT_BACKBONE = 'small'  # the paper's baseline ("Small Init."); 'he' is the Table 7 ablation


@dataclasses.dataclass(frozen=True)
class PaperInitConfig(ReparamConfig):
    """paper_init's hyperparameters.

    Args:
        backbone: ``'small'`` (s_r = sqrt(2/(5d))) or ``'he'`` (s_r = gain/sqrt(d_in)); o and d / sqrt(2N).
        embedding_scaling: multiply the embedding output by 1 / std(W_e) (default on, as in the paper).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
        matrix_lr_sigma_squared: if set, each matrix's learning rate times s_r / sigma (see
            :func:`apply_paper_init`): the steps of WeSaR with fixed gates, without the gates.
    """

    method = METHOD

    backbone: str = DEFAULT_BACKBONE
    embedding_scaling: bool = True
    role_map: Optional[dict[str, str]] = None
    init_mode: str = 'auto'
    matrix_lr_sigma_squared: Optional[float] = None

    def validate(self) -> None:
        check_choice('backbone', self.backbone, BACKBONES)
        check_bool('embedding_scaling', self.embedding_scaling)
        if self.matrix_lr_sigma_squared is not None:
            check_positive('matrix_lr_sigma_squared', self.matrix_lr_sigma_squared)
        super().validate()


def apply_paper_init(
    model: nn.Module, optimizers: Optimizers = None, *, seed: int | None = None, **hparams
) -> nn.Module:
    """Initialize every weight matrix of ``model`` with its Table 1 std and add embedding scaling.

    ``hparams`` are :class:`PaperInitConfig`'s fields (``backbone``, ``embedding_scaling``,
    ``role_map``, ``init_mode``, ``matrix_lr_sigma_squared``).

    Each matrix of role r gets W ~ N(0, s_r^2) (``backbone_std``; biases zero). With
    ``embedding_scaling`` the token embedding becomes a :class:`ScaledEmbedding` that multiplies
    its output by 1 / s_e (Small: sqrt(5d/2), He: sqrt(d)), sharing the same weight Parameter,
    so ``optimizers`` and weight tying are unaffected (nothing is added to them). A model still
    on the meta device is initialized the same way when Composer materializes it (every
    ``param_init_fn`` is routed). Each matrix is drawn from its own seed (``seed`` and its name),
    the same on every rank. ``init_mode='auto'`` refuses a model loaded with ``from_pretrained``;
    ``'reinit'`` re-initializes it. Errors are raised before the model changes.

    ``matrix_lr_sigma_squared``: move each matrix (the embedding too) into a param group of
    ``optimizers`` whose learning rate is the run's times s_r / sigma, sigma^2 this value. With
    Adam the step on W does not depend on W's scale, so WeSaR with fixed gates a_r = s_r / sigma
    moves a_r W by lr * s_r / sigma; this gives the gate-free model the same steps (apart from
    Adam's epsilon, gradient clipping, which sees other gradients, and weight decay, which
    Composer's ``decoupled_adamw`` applies at the same rate to both). On the Small backbone with
    sigma^2 = 2 / (5d) only W_o and W_d change: their learning rate is divided by sqrt(2N).
    """
    return apply_paper_init_config(model, optimizers, PaperInitConfig.from_kwargs(**hparams), seed)


def apply_paper_init_config(
    model: nn.Module, optimizers: Optimizers, config: PaperInitConfig, seed: int | None = None, method: str = METHOD
) -> nn.Module:
    """:func:`apply_paper_init` with a validated config; ``method`` marks the model (residual_scaling passes its own)."""
    optimizers = check_optimizers(METHOD, optimizers)
    lr_sigma_squared = config.matrix_lr_sigma_squared
    if lr_sigma_squared is not None and not optimizers:
        raise ValueError('paper_init: matrix_lr_sigma_squared needs the optimizer; pass optimizers=.')
    shape, specs, _ = discover(model, method, config.role_map, config.init_mode, config.init_modes)
    base_seed = draw_base_seed() if seed is None else int(seed)
    stds = [
        (spec, tuple(backbone_std(role, spec.d_in, shape, config.backbone) for role in spec.roles)) for spec in specs
    ]
    if lr_sigma_squared is not None:
        if shape.tied_embeddings:
            raise ValueError(
                'paper_init: matrix_lr_sigma_squared needs untied embeddings: a tied W_e is also the head, '
                "whose gate in WeSaR differs from the embedding's, so no one learning rate matches both.",
            )
        lr_factors = _matrix_lr_factors(stds, optimizers[0], math.sqrt(lr_sigma_squared))

    for spec, role_stds in stds:
        MatrixInit(spec.slice_sizes, role_stds, matrix_seed(base_seed, spec.name)).mark(spec.module)
        spec.module.reparam_method = method  # marks the model as initialized by this algorithm
    matrices = [spec.module for spec in specs]
    if config.embedding_scaling:
        scale = 1.0 / embedding_std(shape, config.backbone)
        replacements = {spec.module: _scaled_embedding(spec.module, scale) for spec in specs if spec.is_embedding}
        if not replacements:
            log.warning('paper_init: no token embedding found; no embedding scaling applied.')
        for embedding in replacements.values():
            embedding.reparam_method = method
        swap_modules(model, replacements)
        matrices = [replacements.get(m, m) for m in matrices]
    for module in matrices:
        if not is_meta(module):  # a meta model is initialized when Composer materializes it
            init_matrix(module)
    route_param_init_fn(model, init_matrix, method)
    log.info(
        'paper_init: %s init of %d matrices (embedding scaling %s).',
        config.backbone,
        len(stds),
        config.embedding_scaling,
    )
    if lr_sigma_squared is not None:
        _split_param_groups(optimizers[0], lr_factors)
        log.info(
            'paper_init: per-matrix learning rates lr * s_r / sigma (sigma^2=%g): factors %s.',
            lr_sigma_squared,
            ', '.join(f'{f:.3g}' for f in sorted({f for _, f in lr_factors})),
        )
    return model


def _matrix_lr_factors(
    stds: list[tuple[MatrixSpec, tuple[float, ...]]], optimizer: Optimizer, sigma: float
) -> list[tuple[nn.Parameter, float]]:
    """(weight, s_r / sigma) of every matrix; refuses a weight whose slices differ in s_r or that the optimizer lacks."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
    factors = []
    for spec, role_stds in stds:
        if max(role_stds) > min(role_stds) * (1 + 1e-9):
            raise ValueError(
                f'paper_init: matrix_lr_sigma_squared needs one std per parameter, but {spec.name} has '
                f'slices of stds {role_stds} (roles {spec.roles}).',
            )
        if id(spec.module.weight) not in in_optimizer:
            raise ValueError(f'paper_init: matrix_lr_sigma_squared: {spec.name}.weight is not in the optimizer.')
        factors.append((spec.module.weight, role_stds[0] / sigma))
    return factors


def _split_param_groups(optimizer: Optimizer, factors: list[tuple[nn.Parameter, float]]) -> None:
    """Move each weight out of its group into a copy of that group with lr (and initial_lr) times its factor."""
    moved = {id(p): f for p, f in factors}
    new_groups: dict[tuple[int, float], dict] = {}
    for index, group in enumerate(list(optimizer.param_groups)):
        keep = []
        for p in group['params']:
            if id(p) not in moved:
                keep.append(p)
                continue
            key = (index, moved[id(p)])
            if key not in new_groups:
                new = {k: v for k, v in group.items() if k != 'params'}
                for name in ('lr', 'initial_lr'):
                    if name in new:
                        new[name] = new[name] * moved[id(p)]
                new_groups[key] = {**new, 'params': []}
            new_groups[key]['params'].append(p)
        group['params'] = keep
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g['params']]
    for group in new_groups.values():
        optimizer.add_param_group(group)


def _scaled_embedding(old: nn.Embedding, scale: float) -> ScaledEmbedding:
    new = ScaledEmbedding(
        old.num_embeddings,
        old.embedding_dim,
        padding_idx=old.padding_idx,
        max_norm=old.max_norm,
        norm_type=old.norm_type,
        scale_grad_by_freq=old.scale_grad_by_freq,
        sparse=old.sparse,
        device='meta',
        output_scale=scale,
    )
    adopt(new, old)
    spec = MatrixInit.of(old)
    assert spec is not None
    spec.mark(new)
    return new


class PaperInit(ReparamAlgorithm):
    """Composer algorithm for the paper's baselines: runs :func:`apply_paper_init` at ``Event.INIT``.

    YAML: ``algorithms: {paper_init: {backbone: small}}`` (the "Small Init." baseline) or
    ``{backbone: he}`` (the He-init ablation of Table 7); the hyperparameters are
    :class:`PaperInitConfig`'s. An llm-foundry ``hf_checkpointer`` in the same run exports the
    model with the embedding scaling folded into W_e, which loads with plain ``transformers``.
    """

    config_class = PaperInitConfig
    apply_function = apply_paper_init
