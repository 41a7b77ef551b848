"""sigma-Reparam (Zhai et al. 2023), one of the paper's compared reparameterizations.

Table 4: every weight matrix, trainable, normalized, scaled by matrix. W_bar = a / ||W||_2 * W,
a trainable scalar a initialized to 1, ||W||_2 estimated by one power iteration per training
step and not differentiated (Appendix C.2). The actual W ~ N(0, sigma^2) with one sigma for all
matrices (tuned in the paper over {1, 4, 16, 64, 256}e-5; best 64e-5 with pre-LN, Table 6); at
initialization W_bar does not depend on sigma (every matrix has spectral norm 1), sigma sets
how far Adam's steps move W relative to its size.

Embedding scaling (every method of the paper uses it) multiplies the embedding output by
1 / std(W_bar_e) at initialization, so the residual stream starts at unit variance: with
W_e ~ N(0, sigma^2) of shape V x d, ||W_e||_2 ~ sigma (sqrt(V) + sqrt(d)), so the factor is the
constant sqrt(V) + sqrt(d) (independent of sigma and of the draw).

Pre-LN only through llm-foundry's MPT: its block is fixed as x + f(LN(x)) (``MPTModel.block_class``
is ``MPTBlock``, with no config switch for post-LN). A post-LN decoder such as a Hugging Face OPT
with ``do_layer_norm_before: false`` (through ``hf_causal_lm``; its ``fc1`` / ``fc2`` need
``role_map``) takes this algorithm, but that is another architecture than the paper's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from composer.core import Event, State
from composer.loggers import Logger
from torch import nn

from wesar_composer.algorithms.sigma_reparam.modules import (
    METHOD,
    SigmaReparamEmbedding,
    SigmaReparamLinear,
    request_power_iteration,
)
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import Optimizers, check_bool, check_non_negative, check_optimizers, check_positive
from wesar_composer.reparam.config import ReparamConfig
from wesar_composer.reparam.surgery import add_param_group, adopt, discover, install
from wesar_composer.roles import MatrixSpec, ModelShape

log = logging.getLogger(__name__)

__all__ = [
    'SigmaReparam',
    'SigmaReparamConfig',
    'apply_sigma_reparam',
    'embedding_output_scale',
    'DEFAULT_SIGMA_SQUARED',
]

DEFAULT_SIGMA_SQUARED = 64e-5  # Table 6: the best of {1, 4, 16, 64, 256}e-5 for sigma-Reparam with pre-LN


@dataclasses.dataclass(frozen=True)
class SigmaReparamConfig(ReparamConfig):
    """sigma_reparam's hyperparameters.

    Args:
        sigma_squared: variance of every actual weight matrix at init (default 64e-5, Table 6 pre-LN).
        embedding_scaling: multiply the embedding output by sqrt(V) + sqrt(d) = 1 / std(W_bar_e) at init (default on, as in the paper).
        gate_weight_decay: weight decay of the scalars a (default 0, no decay).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: refuse pretrained weights) or ``'reinit'`` (discard them).
    """

    method = METHOD

    sigma_squared: float = DEFAULT_SIGMA_SQUARED
    embedding_scaling: bool = True
    gate_weight_decay: float = 0.0
    role_map: Optional[dict[str, str]] = None
    init_mode: str = 'auto'

    def validate(self) -> None:
        check_positive('sigma_squared', self.sigma_squared)
        check_bool('embedding_scaling', self.embedding_scaling)
        check_non_negative('gate_weight_decay', self.gate_weight_decay)
        super().validate()


def embedding_output_scale(num_embeddings: int, embedding_dim: int) -> float:
    """1 / std(W_bar_e) at init: ||W||_2 / std(W) of a Gaussian V x d matrix, sqrt(V) + sqrt(d)."""
    return math.sqrt(num_embeddings) + math.sqrt(embedding_dim)


def apply_sigma_reparam(
    model: nn.Module, optimizers: Optimizers = None, *, seed: int | None = None, **hparams
) -> nn.Module:
    """Reparameterize every weight matrix of ``model`` as a / ||W||_2 * W (Appendix C.2).

    ``hparams`` are :class:`SigmaReparamConfig`'s fields (``sigma_squared``, ``embedding_scaling``,
    ``gate_weight_decay``, ``role_map``, ``init_mode``).

    Each matrix becomes a :class:`SigmaReparamLinear` / :class:`SigmaReparamEmbedding` sharing
    its weight ``Parameter`` (drawn N(0, sigma^2)); the scalars a (one per q / k / v slice of a
    fused projection) join the first optimizer in a param group of their own with
    ``gate_weight_decay``. Outside a Composer Trainer, call
    :func:`~wesar_composer.algorithms.sigma_reparam.request_power_iteration` once per step.
    Everything is validated before the model changes.
    """
    config = SigmaReparamConfig.from_kwargs(**hparams)
    sigma = math.sqrt(config.sigma_squared)
    optimizers = check_optimizers(METHOD, optimizers)
    shape, specs, _ = discover(model, METHOD, config.role_map, config.init_mode, config.init_modes)
    tied_head = shape.tied_embeddings and not any(s.roles == ('p',) for s in specs)  # MPT: wte is the head
    replacements, seen = {}, set()
    for spec in specs:
        shared = id(spec.module.weight) in seen  # a tied Hugging Face head: W is drawn once, by the embedding
        seen.add(id(spec.module.weight))
        replacements[spec] = _reparameterized_module(
            spec, shape, sigma, config.embedding_scaling, tied_head, not shared
        )
    install(model, replacements, seed)
    if optimizers:
        gates = [m.gate for m in replacements.values()]
        gates += [m.unembed_gate for m in replacements.values() if getattr(m, 'unembed_gate', None) is not None]
        add_param_group(optimizers[0], gates, config.gate_weight_decay)
    log.info('sigma_reparam: %d matrices (sigma^2=%g).', len(specs), config.sigma_squared)
    return model


def _reparameterized_module(
    spec: MatrixSpec,
    shape: ModelShape,
    sigma: float,
    embedding_scaling: bool,
    tied_head: bool,
    draw: bool,
) -> nn.Module:
    old = spec.module
    std = sigma if draw else None
    if spec.is_embedding:
        new = SigmaReparamEmbedding(
            old.num_embeddings,
            old.embedding_dim,
            old.padding_idx,
            device='meta',
            tied_head=tied_head,
            output_scale=embedding_output_scale(old.num_embeddings, old.embedding_dim) if embedding_scaling else 1.0,
            weight_std=std,
        )
        new.roles = spec.roles + (('p',) if tied_head else ())
    else:
        new = SigmaReparamLinear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device='meta',
            slice_sizes=spec.slice_sizes,
            weight_std=std,
        )
        new.roles = spec.roles
    return adopt(new, old)


class SigmaReparam(ReparamAlgorithm):
    """Composer algorithm for sigma-Reparam: :func:`apply_sigma_reparam` at ``Event.INIT``, one power
    iteration per step (requested at ``Event.BATCH_START``, run by the first forward of the step).

    YAML: ``algorithms: {sigma_reparam: {sigma_squared: 6.4e-4}}``. The scalars a appear in the
    update-ratio monitor as ``gate/...``. An llm-foundry ``hf_checkpointer`` in the same run
    exports the merged model (a / sigma and the embedding scaling folded into plain weights).
    """

    config_class = SigmaReparamConfig
    apply_function = apply_sigma_reparam

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START or super().match(event, state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            request_power_iteration(state.model)
            return
        super().apply(event, state, logger)
