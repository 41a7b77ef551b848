"""WeSaR: weight scaling as reparameterization (Nishida et al. 2024), as a Composer algorithm."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch
from composer.utils import dist
from torch import nn

from wesar_composer.algorithms.wesar.modules import METHOD, GatedEmbedding, GatedLinear, refresh_nonzero_gates
from wesar_composer.reparam.algorithm import ReparamAlgorithm
from wesar_composer.reparam.checks import (
    Optimizers,
    check_bool,
    check_choice,
    check_non_negative,
    check_optimizers,
    check_positive,
    check_positive_int,
)
from wesar_composer.reparam.config import INIT_MODES, ReparamConfig
from wesar_composer.reparam.surgery import add_param_group, adopt, discover, install
from wesar_composer.roles import BACKBONES, MatrixSpec, ModelShape, backbone_std, embedding_std

log = logging.getLogger(__name__)

__all__ = ['WeSaR', 'WeSaRConfig', 'apply_wesar', 'GATED_MODULES']

DEFAULT_SIGMA_SQUARED = 4e-5  # Section 4.3: sigma^2 = 4e-5, the Small-init std of a d = 10,000 model
GATED_MODULES = (GatedLinear, GatedEmbedding)


@dataclasses.dataclass(frozen=True)
class WeSaRConfig(ReparamConfig):
    """WeSaR's hyperparameters.

    Args:
        sigma_squared: variance of every actual weight matrix (default 4e-5).
        backbone: ``'he'`` (paper default) or ``'small'``: which Table 1 stds the gates carry.
        trainable_gates: ``False`` freezes the gates (the fixed-a ablation of Table 7).
        gate_weight_decay: weight decay of the gate param group (default 0, no decay).
        embedding_scaling: multiply the embedding output by 1 / sigma (default on).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: new init; refuse pretrained weights), ``'reinit'`` or
            ``'preserve'`` (keep a pretrained model's function; see :func:`apply_wesar`).
        sigma_reference_width: ``None`` (default: sigma^2 = ``sigma_squared`` at any width, as in
            the paper) or a d_model at which ``sigma_squared`` holds; other widths get
            sigma^2 = sigma_squared * sigma_reference_width / d_model.
    """

    method = METHOD
    init_modes = (*INIT_MODES, 'preserve')

    sigma_squared: float = DEFAULT_SIGMA_SQUARED
    backbone: str = 'he'
    trainable_gates: bool = True
    gate_weight_decay: float = 0.0
    embedding_scaling: bool = True
    role_map: Optional[dict[str, str]] = None
    init_mode: str = 'auto'
    sigma_reference_width: Optional[int] = None

    def validate(self) -> None:
        check_positive('sigma_squared', self.sigma_squared)
        if self.sigma_reference_width is not None:
            check_positive_int('sigma_reference_width', self.sigma_reference_width)
        check_choice('backbone', self.backbone, BACKBONES)
        check_bool('trainable_gates', self.trainable_gates)
        check_non_negative('gate_weight_decay', self.gate_weight_decay)
        check_bool('embedding_scaling', self.embedding_scaling)
        super().validate()


def apply_wesar(model: nn.Module, optimizers: Optimizers = None, *, seed: int | None = None, **hparams) -> nn.Module:
    """Reparameterize every weight matrix W of ``model`` as a_r * W (Section 4.1).

    ``hparams`` are :class:`WeSaRConfig`'s fields (``sigma_squared``, ``backbone``,
    ``trainable_gates``, ``gate_weight_decay``, ``embedding_scaling``, ``role_map``,
    ``init_mode``, ``sigma_reference_width``); an unknown one raises ``TypeError`` listing them.

    W ~ N(0, sigma^2) for every matrix; a_r starts at s_r / sigma, with s_r the backbone std
    of the matrix's role (Table 1). The token embedding keeps gate 1 and, with
    ``embedding_scaling``, its output is multiplied by 1 / sigma so that the residual stream
    starts at unit variance. Gates join the first optimizer in a param group of their own with
    ``gate_weight_decay``; ``trainable_gates=False`` freezes them (the paper's fixed-a ablation).

    ``init_mode``: ``'auto'`` re-initializes, but refuses a model loaded with
    ``from_pretrained``; ``'reinit'`` re-initializes whatever the weights; ``'preserve'``
    keeps a trained model's function: each W (each q / k / v slice) is rescaled to std sigma
    and its gate takes the old std / sigma, so a * W is the trained matrix.
    Each matrix is drawn from its own seed (``seed`` and its name; ``seed=None`` takes one
    from the global RNG), so every rank and every materialization order draws the same W.

    ``sigma_reference_width``: if set, ``sigma_squared`` is the value at that d_model and the
    model gets sigma^2 = sigma_squared * sigma_reference_width / d_model, so that sigma keeps
    its ratio to the Small-init std sqrt(2 / (5d)) at every width (2048 with the default 4e-5:
    the paper's 1.3B ratio, 0.45). With Adam the relative step of every matrix is about
    lr / sigma, so a fixed sigma on a narrow model is a much larger step than the paper's.

    Everything is validated before the model changes: a bad value raises ``ValueError`` and
    leaves the model as it was. With ``optimizers``, each step of the first one ends with
    :func:`refresh_nonzero_gates` (one small device-to-host read); a loop that trains the gates
    with an optimizer it adds them to itself calls it after each step.
    """
    config = WeSaRConfig.from_kwargs(**hparams)
    optimizers = check_optimizers(METHOD, optimizers)
    shape, specs, mode = discover(model, METHOD, config.role_map, config.init_mode, config.init_modes)
    sigma_squared = config.sigma_squared
    if config.sigma_reference_width is not None:
        sigma_squared = sigma_squared * config.sigma_reference_width / shape.d_model
    sigma = math.sqrt(sigma_squared)
    preserved = _preserved_stds(specs) if mode == 'preserve' else None
    trainable, backbone = config.trainable_gates, config.backbone
    replacements = {
        spec: _gated_module(spec, shape, sigma, backbone, trainable, config.embedding_scaling, specs, preserved)
        for spec in specs
    }
    rescale = (lambda: _rescale_to_sigma(specs, preserved, sigma)) if preserved is not None else None
    install(model, replacements, seed, before_init=rescale)
    gates = [m.gate for m in replacements.values()]
    gates += [m.unembed_gate for m in replacements.values() if getattr(m, 'unembed_gate', None) is not None]
    if trainable and optimizers:
        add_param_group(optimizers[0], gates, config.gate_weight_decay)
        gated = list(replacements.values())
        optimizers[0].register_step_post_hook(lambda *_: refresh_nonzero_gates(gated))
    log.info(
        'WeSaR gated %d matrices (sigma^2=%g, backbone=%s, %s).',
        len(specs),
        sigma_squared,
        backbone,
        'trained weights preserved: W rescaled to sigma, gates carry the old scale' if preserved else 'new init',
    )
    return model


def _preserved_stds(specs: list[MatrixSpec]) -> Optional[dict[int, tuple[float, ...]]]:
    """Std of every row slice of every trained weight, keyed by id(weight); None on a meta model.

    A meta-device model (the ranks other than 0 under ``init_device: mixed``) has no weights to
    preserve: it receives rank 0's rescaled weights and gates through ``sync_module_states``.
    """
    weights = {id(s.module.weight): s for s in specs}
    if any(s.module.weight.is_meta for s in weights.values()):
        if dist.get_global_rank() == 0:
            raise ValueError(
                "wesar: init_mode 'preserve' needs the model's trained weights, but they are on the meta device. "
                'Load the pretrained model on rank 0 (init_device: cpu or mixed).',
            )
        return None
    stds = {}
    for key, spec in weights.items():
        slices = spec.module.weight.detach().float().split(list(spec.slice_sizes))
        stds[key] = tuple(w.std().item() for w in slices)
        bad = [std for std in stds[key] if not (math.isfinite(std) and std > 0)]
        if bad:
            raise ValueError(f'wesar: cannot preserve {spec.name}: its weight has std {bad[0]!r} (needs > 0).')
    return stds


@torch.no_grad()
def _rescale_to_sigma(specs: list[MatrixSpec], stds: dict[int, tuple[float, ...]], sigma: float) -> None:
    """W <- W * sigma / std(W), slice by slice, once per weight Parameter (a tied head shares it)."""
    done: set[int] = set()
    for spec in specs:
        weight = spec.module.weight
        if id(weight) in done:
            continue
        done.add(id(weight))
        for rows, std in zip(weight.split(list(spec.slice_sizes)), stds[id(weight)]):
            rows.mul_(sigma / std)


def _gated_module(
    spec: MatrixSpec,
    shape: ModelShape,
    sigma: float,
    backbone: str,
    trainable: bool,
    embedding_scaling: bool,
    specs: list[MatrixSpec],
    preserved: Optional[dict[int, tuple[float, ...]]] = None,
) -> nn.Module:
    """The gated replacement of one matrix; ``preserved`` (trained stds) gives gates old std / sigma and keeps W."""
    old = spec.module
    trained = preserved.get(id(old.weight)) if preserved is not None else None
    weight_std = None if trained is not None else sigma
    if spec.is_embedding:
        output_scale = 1.0 / sigma if embedding_scaling else 1.0
        tied_head = shape.tied_embeddings and not any(s.roles == ('p',) for s in specs)  # MPT: wte is the head
        unembed_gate = None
        if trained is not None:
            gate = trained[0] / (sigma * output_scale)  # a_e W' scale = W with W' = W sigma / std
            unembed_gate = trained[0] / sigma if tied_head else None
        else:
            gate = 1.0 if embedding_scaling else embedding_std(shape, backbone) / sigma
            if tied_head:
                unembed_gate = backbone_std('p', old.embedding_dim, shape, backbone) / sigma
        new = GatedEmbedding(
            old.num_embeddings,
            old.embedding_dim,
            old.padding_idx,
            device='meta',
            gate_init=gate,
            unembed_gate_init=unembed_gate,
            output_scale=output_scale,
            weight_std=weight_std,
            trainable_gate=trainable,
        )
    else:
        if trained is not None:
            gate_init = [std / sigma for std in trained]
        else:
            gate_init = [backbone_std(role, spec.d_in, shape, backbone) / sigma for role in spec.roles]
        new = GatedLinear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device='meta',
            gate_init=gate_init,
            slice_sizes=spec.slice_sizes,
            weight_std=weight_std,
            trainable_gate=trainable,
        )
    new.roles = spec.roles + (('p',) if isinstance(new, GatedEmbedding) and new.unembed_gate is not None else ())
    return adopt(new, old, requires_grad=trainable)


class WeSaR(ReparamAlgorithm):
    """Composer algorithm for WeSaR: runs :func:`apply_wesar` at ``Event.INIT``.

    An llm-foundry ``hf_checkpointer`` in the same run exports the merged model (gates folded
    into the weights), which loads with plain ``transformers``. Checkpoints of the run carry
    the gates; loading one into a run without ``wesar``, or a checkpoint without gates into
    a run with it, raises an error naming the algorithm. The initial weights depend on the
    run's seed only, not on the rank or the FSDP wrapping.

    YAML: ``algorithms: {wesar: {sigma_squared: 4.0e-5, backbone: he}}``; the hyperparameters
    are :class:`WeSaRConfig`'s.
    """

    config_class = WeSaRConfig
    apply_function = apply_wesar
