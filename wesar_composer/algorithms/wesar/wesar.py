"""WeSaR: weight scaling as reparameterization (Nishida et al. 2024), as a Composer algorithm."""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist, module_surgery
from llmfoundry.callbacks import HuggingFaceCheckpointer
from torch import nn
from torch.optim import Optimizer

from wesar_composer.algorithms.wesar.gated_modules import GatedEmbedding, GatedLinear
from wesar_composer.algorithms.wesar.hf_export import fold_gates_on_hf_export
from wesar_composer.param_init import route_param_init_fn
from wesar_composer.reparam.checks import (
    INIT_MODES,
    CheckedHparams,
    check_bool,
    check_choice,
    check_non_negative,
    check_optimizers,
    check_positive,
    check_role_map,
)
from wesar_composer.reparam.init import draw_base_seed, matrix_seed
from wesar_composer.reparam.pretrained import resolve_init_mode
from wesar_composer.reparam.trainer import check_loaded_checkpoint, guard_checkpoints, run_init_mode
from wesar_composer.roles import (
    BACKBONES,
    MatrixSpec,
    ModelShape,
    backbone_std,
    check_complete,
    embedding_std,
    find_matrices,
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
    trainable_gates: bool = True,
    gate_weight_decay: float = 0.0,
    embedding_scaling: bool = True,
    role_map: Optional[Mapping[str, str]] = None,
    init_mode: str = 'auto',
) -> float:
    """Validate the hyperparameters and return sigma."""
    check_positive('sigma_squared', sigma_squared)
    check_choice('backbone', backbone, BACKBONES)
    check_bool('trainable_gates', trainable_gates)
    check_non_negative('gate_weight_decay', gate_weight_decay)
    check_bool('embedding_scaling', embedding_scaling)
    check_role_map(role_map)
    check_choice('init_mode', init_mode, INIT_MODES)
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
    init_mode: str = 'auto',
    seed: Optional[int] = None,
) -> nn.Module:
    """Reparameterize every weight matrix W of ``model`` as a_r * W (Section 4.1).

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

    Everything is validated before the model changes: a bad value raises ``ValueError`` and
    leaves the model as it was.
    """
    sigma = check_hparams(
        sigma_squared, backbone, trainable_gates, gate_weight_decay, embedding_scaling, role_map, init_mode,
    )
    optimizers = check_optimizers('wesar', optimizers)
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
    check_complete(model, specs, 'wesar', role_map)
    mode = resolve_init_mode('wesar', init_mode, model)
    preserved = _preserved_stds(specs, sigma) if mode == 'preserve' else None
    base_seed = draw_base_seed() if seed is None else int(seed)

    replacements = {
        spec.module: _gated_module(spec, shape, sigma, backbone, trainable_gates, embedding_scaling, specs, preserved)
        for spec in specs
    }
    for spec in specs:
        replacements[spec.module].init_seed = matrix_seed(base_seed, spec.name)
    module_surgery.replace_module_classes(
        unwrap(model),
        policies={nn.Linear: lambda m, _: replacements.get(m), nn.Embedding: lambda m, _: replacements.get(m)},
    )
    if preserved is not None:
        _rescale_to_sigma(specs, preserved, sigma)
    for replacement in replacements.values():
        if not replacement.weight.is_meta:  # a meta model is initialized when Composer materializes it
            replacement.reset_parameters()
    _route_param_init_fn(model)
    gates = [m.gate for m in replacements.values()]
    gates += [m.unembed_gate for m in replacements.values() if getattr(m, 'unembed_gate', None) is not None]
    if trainable_gates and optimizers:
        _add_gate_group(optimizers[0], gates, gate_weight_decay)
    log.info(
        'WeSaR gated %d matrices (sigma^2=%g, backbone=%s, %s).', len(specs), sigma_squared, backbone,
        'trained weights preserved: W rescaled to sigma, gates carry the old scale' if preserved else 'new init',
    )
    return model


def _preserved_stds(specs: list[MatrixSpec], sigma: float) -> Optional[dict[int, tuple[float, ...]]]:
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
            raise ValueError(f"wesar: cannot preserve {spec.name}: its weight has std {bad[0]!r} (needs > 0).")
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


class WeSaR(CheckedHparams, Algorithm):
    """Composer algorithm for WeSaR: runs :func:`apply_wesar` at ``Event.INIT``.

    An llm-foundry ``hf_checkpointer`` in the same run exports the merged model (gates folded
    into the weights), which loads with plain ``transformers``. Checkpoints of the run carry
    the gates; loading one into a run without ``wesar``, or a checkpoint without gates into
    a run with it, raises an error naming the algorithm. The initial weights depend on the
    run's seed only, not on the rank or the FSDP wrapping.

    YAML: ``algorithms: {wesar: {sigma_squared: 4.0e-5, backbone: he}}``.

    Args:
        sigma_squared: variance of every actual weight matrix (default 4e-5).
        backbone: ``'he'`` (paper default) or ``'small'``: which Table 1 stds the gates carry.
        trainable_gates: ``False`` freezes the gates (the fixed-a ablation of Table 7).
        gate_weight_decay: weight decay of the gate param group (default 0, no decay).
        embedding_scaling: multiply the embedding output by 1 / sigma (default on).
        role_map: extra ``{regex: role}`` entries for architectures the default map misses.
        init_mode: ``'auto'`` (default: new init; refuse pretrained weights), ``'reinit'`` or
            ``'preserve'`` (keep a pretrained model's function; see :func:`apply_wesar`).
    """

    def __init__(
        self,
        sigma_squared: float = DEFAULT_SIGMA_SQUARED,
        backbone: str = 'he',
        trainable_gates: bool = True,
        gate_weight_decay: float = 0.0,
        embedding_scaling: bool = True,
        role_map: Optional[Mapping[str, str]] = None,
        init_mode: str = 'auto',
    ):
        check_hparams(
            sigma_squared, backbone, trainable_gates, gate_weight_decay, embedding_scaling, role_map, init_mode,
        )
        self.sigma_squared = sigma_squared
        self.backbone = backbone
        self.trainable_gates = trainable_gates
        self.gate_weight_decay = gate_weight_decay
        self.embedding_scaling = embedding_scaling
        self.role_map = dict(role_map) if role_map else None
        self.init_mode = init_mode

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(sigma_squared={self.sigma_squared}, backbone={self.backbone!r}, '
            f'trainable_gates={self.trainable_gates}, gate_weight_decay={self.gate_weight_decay}, '
            f'embedding_scaling={self.embedding_scaling}, role_map={self.role_map}, init_mode={self.init_mode!r})'
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
        apply_wesar(
            state.model,
            optimizers=state.optimizers,
            sigma_squared=self.sigma_squared,
            backbone=self.backbone,
            trainable_gates=self.trainable_gates,
            gate_weight_decay=self.gate_weight_decay,
            embedding_scaling=self.embedding_scaling,
            role_map=self.role_map,
            init_mode=run_init_mode(state, 'wesar', self.init_mode),
            seed=state.rank_zero_seed,
        )
        guard_checkpoints(state)
        for callback in state.callbacks:
            if isinstance(callback, HuggingFaceCheckpointer):
                fold_gates_on_hf_export(callback, state.model)
