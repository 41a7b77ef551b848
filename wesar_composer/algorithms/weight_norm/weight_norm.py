"""Weight Normalization (Salimans and Kingma 2016), one of the paper's compared reparameterizations.

Table 4: every weight matrix, trainable, normalized, scaled by row. Every row w of every matrix
(embedding and head included) is used as W_bar = g / ||w|| * w, with a trainable g per row and the
gradient through the normalization. The actual W ~ N(0, sigma^2) with one sigma for all matrices
(the paper tuned sigma^2 over {1, 4, 16, 64, 256}e-5; best 16e-5, Table 6); g starts at ||w||,
so the model at initialization is the plain model with those weights. Embedding scaling
multiplies the embedding output by 1 / sigma, as for every method of the paper.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from torch import nn

from wesar_composer.algorithms.weight_norm.modules import METHOD, WeightNormEmbedding, WeightNormLinear
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import Optimizers, check_bool, check_non_negative, check_optimizers, check_positive
from wesar_composer.reparam.config import ReparamConfig
from wesar_composer.reparam.surgery import add_param_group, adopt, discover, install
from wesar_composer.roles import MatrixSpec

log = logging.getLogger(__name__)

__all__ = ['WeightNorm', 'WeightNormConfig', 'apply_weight_norm', 'DEFAULT_SIGMA_SQUARED']

DEFAULT_SIGMA_SQUARED = 16e-5  # Table 6: the best of {1, 4, 16, 64, 256}e-5 for Weight Normalization


@dataclasses.dataclass(frozen=True)
class WeightNormConfig(ReparamConfig):
    """weight_norm's hyperparameters.

    Args:
        sigma_squared: variance of every actual weight matrix at init (default 16e-5, Table 6).
        embedding_scaling: multiply the embedding output by 1 / sigma (default on, as in the paper).
        gain_weight_decay: weight decay of the per-row lengths g (default 0, no decay).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
    """

    method = METHOD

    sigma_squared: float = DEFAULT_SIGMA_SQUARED
    embedding_scaling: bool = True
    gain_weight_decay: float = 0.0
    role_map: Optional[dict[str, str]] = None
    init_mode: str = 'auto'

    def validate(self) -> None:
        check_positive('sigma_squared', self.sigma_squared)
        check_bool('embedding_scaling', self.embedding_scaling)
        check_non_negative('gain_weight_decay', self.gain_weight_decay)
        super().validate()


def apply_weight_norm(
    model: nn.Module, optimizers: Optimizers = None, *, seed: int | None = None, **hparams
) -> nn.Module:
    """Weight-normalize every row of every weight matrix of ``model`` (Appendix C.1).

    ``hparams`` are :class:`WeightNormConfig`'s fields (``sigma_squared``, ``embedding_scaling``,
    ``gain_weight_decay``, ``role_map``, ``init_mode``).

    Each matrix becomes a :class:`WeightNormLinear` / :class:`WeightNormEmbedding` sharing its
    weight ``Parameter`` (now the direction v, drawn N(0, sigma^2)) with a new per-row length
    ``weight_g`` = ||v||. The lengths join the first optimizer in a param group of their own
    with ``gain_weight_decay``. A meta-device model gets the same init when Composer
    materializes it. Everything is validated before the model changes.
    """
    config = WeightNormConfig.from_kwargs(**hparams)
    sigma = math.sqrt(config.sigma_squared)
    optimizers = check_optimizers(METHOD, optimizers)
    _, specs, _ = discover(model, METHOD, config.role_map, config.init_mode, config.init_modes)
    replacements, seen = {}, set()
    for spec in specs:
        shared = id(spec.module.weight) in seen  # a tied head: its weight is drawn once, by the embedding
        seen.add(id(spec.module.weight))
        replacements[spec] = _normalized_module(spec, sigma, config.embedding_scaling, draw=not shared)
    install(model, replacements, seed)
    if optimizers:
        add_param_group(optimizers[0], [m.weight_g for m in replacements.values()], config.gain_weight_decay)
    log.info('weight_norm: %d matrices (sigma^2=%g).', len(specs), config.sigma_squared)
    return model


def _normalized_module(spec: MatrixSpec, sigma: float, embedding_scaling: bool, draw: bool) -> nn.Module:
    old = spec.module
    std = sigma if draw else None
    if spec.is_embedding:
        new = WeightNormEmbedding(
            old.num_embeddings,
            old.embedding_dim,
            old.padding_idx,
            device='meta',
            weight_std=std,
            output_scale=1.0 / sigma if embedding_scaling else 1.0,
        )
    else:
        new = WeightNormLinear(
            old.in_features, old.out_features, bias=old.bias is not None, device='meta', weight_std=std
        )
    new.roles = spec.roles
    return adopt(new, old)


class WeightNorm(ReparamAlgorithm):
    """Composer algorithm for Weight Normalization: runs :func:`apply_weight_norm` at ``Event.INIT``.

    YAML: ``algorithms: {weight_norm: {sigma_squared: 1.6e-4}}``. An llm-foundry
    ``hf_checkpointer`` in the same run exports the merged model (W_bar and the embedding
    scaling folded into plain weights), which loads with plain ``transformers``.
    """

    config_class = WeightNormConfig
    apply_function = apply_weight_norm
