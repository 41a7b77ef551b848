"""Weight Normalization (Salimans and Kingma 2016), one of the paper's compared reparameterizations.

Table 4: every weight matrix, trainable, normalized, scaled by row. Every row w of every matrix
(embedding and head included) is used as W_bar = g / ||w|| * w, with a trainable g per row and the
gradient through the normalization. The actual W ~ N(0, sigma^2) with one sigma for all matrices
(the paper tuned sigma^2 over {1, 4, 16, 64, 256}e-5; best 16e-5, Table 6); g starts at ||w||,
so the model at initialization is the plain model with those weights. Embedding scaling
multiplies the embedding output by 1 / sigma, as for every method of the paper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.weight_norm.modules import WeightNormEmbedding, WeightNormLinear
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import (
    check_bool,
    check_choice,
    check_non_negative,
    check_optimizers,
    check_positive,
    check_role_map,
)
from wesar_composer.reparam.surgery import add_param_group, adopt, discover, install
from wesar_composer.roles import MatrixSpec

log = logging.getLogger(__name__)

__all__ = ['WeightNorm', 'apply_weight_norm', 'DEFAULT_SIGMA_SQUARED']

DEFAULT_SIGMA_SQUARED = 16e-5  # Table 6: the best of {1, 4, 16, 64, 256}e-5 for Weight Normalization
METHOD = 'weight_norm'
MODULES = (WeightNormLinear, WeightNormEmbedding)


INIT_MODES = ('auto', 'reinit')


def check_hparams(sigma_squared, embedding_scaling, gain_weight_decay, role_map, init_mode='auto') -> float:
    """Validate the hyperparameters and return sigma."""
    check_positive('sigma_squared', sigma_squared)
    check_bool('embedding_scaling', embedding_scaling)
    check_non_negative('gain_weight_decay', gain_weight_decay)
    check_role_map(role_map)
    check_choice('init_mode', init_mode, INIT_MODES)
    return math.sqrt(sigma_squared)


def apply_weight_norm(
    model: nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]] = None,
    *,
    sigma_squared: float = DEFAULT_SIGMA_SQUARED,
    embedding_scaling: bool = True,
    gain_weight_decay: float = 0.0,
    role_map: Optional[Mapping[str, str]] = None,
    init_mode: str = 'auto',
    seed: Optional[int] = None,
) -> nn.Module:
    """Weight-normalize every row of every weight matrix of ``model`` (Appendix C.1).

    Each matrix becomes a :class:`WeightNormLinear` / :class:`WeightNormEmbedding` sharing its
    weight ``Parameter`` (now the direction v, drawn N(0, sigma^2)) with a new per-row length
    ``weight_g`` = ||v||. The lengths join the first optimizer in a param group of their own
    with ``gain_weight_decay``. A meta-device model gets the same init when Composer
    materializes it. Everything is validated before the model changes.
    """
    sigma = check_hparams(sigma_squared, embedding_scaling, gain_weight_decay, role_map, init_mode)
    optimizers = check_optimizers(METHOD, optimizers)
    _, specs, _ = discover(model, METHOD, role_map, init_mode, INIT_MODES)
    replacements, seen = {}, set()
    for spec in specs:
        shared = id(spec.module.weight) in seen  # a tied head: its weight is drawn once, by the embedding
        seen.add(id(spec.module.weight))
        replacements[spec] = _normalized_module(spec, sigma, embedding_scaling, draw=not shared)
    install(model, replacements, seed)
    if optimizers:
        add_param_group(optimizers[0], [m.weight_g for m in replacements.values()], gain_weight_decay)
    log.info('weight_norm: %d matrices (sigma^2=%g).', len(specs), sigma_squared)
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

    Args:
        sigma_squared: variance of every actual weight matrix at init (default 16e-5, Table 6).
        embedding_scaling: multiply the embedding output by 1 / sigma (default on, as in the paper).
        gain_weight_decay: weight decay of the per-row lengths g (default 0, no decay).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
    """

    method = METHOD
    init_modes = INIT_MODES

    def __init__(
        self,
        sigma_squared: float = DEFAULT_SIGMA_SQUARED,
        embedding_scaling: bool = True,
        gain_weight_decay: float = 0.0,
        role_map: Optional[Mapping[str, str]] = None,
        init_mode: str = 'auto',
    ):
        check_hparams(sigma_squared, embedding_scaling, gain_weight_decay, role_map, init_mode)
        self.init_mode = init_mode
        self.sigma_squared = sigma_squared
        self.embedding_scaling = embedding_scaling
        self.gain_weight_decay = gain_weight_decay
        self.role_map = dict(role_map) if role_map else None

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(sigma_squared={self.sigma_squared}, embedding_scaling={self.embedding_scaling}, '
            f'gain_weight_decay={self.gain_weight_decay}, role_map={self.role_map}, init_mode={self.init_mode!r})'
        )

    def apply_to(self, model, optimizers, *, init_mode, seed):
        return apply_weight_norm(
            model,
            optimizers=optimizers,
            sigma_squared=self.sigma_squared,
            embedding_scaling=self.embedding_scaling,
            gain_weight_decay=self.gain_weight_decay,
            role_map=self.role_map,
            init_mode=init_mode,
            seed=seed,
        )
