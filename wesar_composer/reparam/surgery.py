"""Module surgery shared by every algorithm: swap modules, adopt the old weight, route meta init.

- :func:`adopt` makes a replacement built on meta take over its module: the same weight
  ``Parameter`` (so an optimizer built before the Trainer and weight tying stay intact), the
  bias, llm-foundry's markers (``_fused``, ``_is_residual``, ``_fsdp_wrap``), the plain class it
  folds back into, and its own extra tensors on the weight's device and dtype.
- :func:`swap_modules` puts replacements in place with Composer's module surgery.
- :func:`add_param_group` gives new parameters a param group of their own.
- :func:`discover` runs every check before a change; :func:`install` swaps, seeds, initializes
  and routes meta init.
- :func:`route_param_init_fn`: Composer materializes a meta-device model module by module,
  calling ``obj.param_init_fn(module)`` (llm-foundry's MPT has one) or ``reset_parameters``;
  algorithms applied at ``Event.INIT`` see the model still on meta, so they route every
  ``param_init_fn`` through a handler that initializes the modules it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch
from composer.utils import module_surgery
from torch import nn
from torch.optim import Optimizer

from wesar_composer.reparam.init import draw_base_seed, matrix_seed
from wesar_composer.reparam.modules import check_unreparameterized
from wesar_composer.reparam.pretrained import resolve_init_mode
from wesar_composer.roles import MatrixSpec, ModelShape, check_complete, find_matrices, model_shape, unwrap

__all__ = [
    'LLMFOUNDRY_MARKERS',
    'adopt',
    'swap_modules',
    'add_param_group',
    'route_param_init_fn',
    'is_meta',
    'discover',
    'install',
]

LLMFOUNDRY_MARKERS = ('_fused', '_is_residual', '_fsdp_wrap')  # llm-foundry's module attributes for init and FSDP
ROUTED_ATTR = '_wesar_composer_routes'  # the handlers' tags a routed param_init_fn carries


class _SurgeryNote(logging.Filter):
    """Composer's surgery asks callers without ``optimizers`` to add new parameters; the algorithms do (add_param_group)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('optimizers was not provided')


logging.getLogger(module_surgery.__name__).addFilter(_SurgeryNote())


def copy_markers(old: nn.Module, new: nn.Module) -> None:
    for attr in LLMFOUNDRY_MARKERS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))


def adopt(new: nn.Module, old: nn.Module, requires_grad: bool = True) -> nn.Module:
    """``new`` (built on meta) takes ``old``'s weight, bias and markers; its own tensors move to the weight's device."""
    device, dtype = old.weight.device, old.weight.dtype
    new.weight = old.weight
    if isinstance(new, nn.Linear):
        new.bias = old.bias
    new.plain_class = type(old)  # what the fold turns it back into
    copy_markers(old, new)
    for name, param in list(new.named_parameters(recurse=False)):
        if name not in ('weight', 'bias'):  # gates, lengths: values are set by reset_parameters
            setattr(
                new,
                name,
                nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype), requires_grad=requires_grad),
            )
    for name, buffer in list(new.named_buffers(recurse=False)):
        setattr(new, name, buffer.new_empty(buffer.shape, device=device))  # keeps the buffer's own dtype
    return new


def swap_modules(model: nn.Module, replacements: Mapping[nn.Module, nn.Module]) -> None:
    """Put each replacement in place of its module with Composer's ``module_surgery``."""
    classes = {type(old) for old in replacements}
    policies = {cls: (lambda m, _: replacements.get(m)) for cls in classes}
    module_surgery.replace_module_classes(unwrap(model), policies=policies)


def add_param_group(optimizer: Optimizer, params: Iterable[nn.Parameter], weight_decay: float) -> None:
    """New parameters get a param group of their own: the first group's settings, their own weight decay."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != 'params'}
    group.update(params=list(params), weight_decay=weight_decay)
    optimizer.add_param_group(group)


def is_meta(module: nn.Module) -> bool:
    """Whether any of the module's own parameters still lives on the meta device."""
    return any(p.is_meta for p in module.parameters(recurse=False))


def reset_modules_of(types: tuple[type, ...]) -> Callable[[nn.Module], bool]:
    """A ``route_param_init_fn`` handler: ``reset_parameters`` for modules of ``types``."""

    def handler(module: nn.Module) -> bool:
        if not isinstance(module, types):
            return False
        module.reset_parameters()
        return True

    return handler


def route_param_init_fn(model: nn.Module, handler: Callable[[nn.Module], bool], tag: str) -> int:
    """Wrap every ``param_init_fn`` of ``model`` (the Composer model and its submodules) with ``handler``.

    ``handler(module)`` initializes ``module`` and returns True, or returns False to leave it to
    the original function. Routing twice with the same ``tag`` is a no-op. Returns how many
    ``param_init_fn`` were routed.
    """
    routed = 0
    for module in [model, *unwrap(model).modules()]:
        original = getattr(module, 'param_init_fn', None)
        if not callable(original) or tag in getattr(original, ROUTED_ATTR, ()):
            continue

        def param_init_fn(target: nn.Module, _original=original) -> None:
            if not handler(target):
                _original(target)

        setattr(param_init_fn, ROUTED_ATTR, (*getattr(original, ROUTED_ATTR, ()), tag))
        module.param_init_fn = param_init_fn
        routed += 1
    return routed


def discover(
    model: nn.Module,
    method: str,
    role_map: Optional[Mapping[str, str]],
    init_mode: str,
    modes: tuple[str, ...],
) -> tuple[ModelShape, list[MatrixSpec], str]:
    """Every check an algorithm makes before it changes anything: (shape, matrices, resolved init mode).

    Refuses a model another algorithm of this package changed, a model with no matrix or with
    projections role discovery does not cover, and pretrained weights under ``init_mode='auto'``.
    """
    check_unreparameterized(model, method)
    shape = model_shape(model)
    specs = find_matrices(model, role_map)
    if not specs:
        raise ValueError(
            f'{method}: no weight matrix of {type(unwrap(model)).__name__} matched a role; nothing to change. '
            'Pass role_map={regex: role} naming its modules.',
        )
    check_complete(model, specs, method, role_map)
    return shape, specs, resolve_init_mode(method, init_mode, model, modes)


def install(
    model: nn.Module,
    replacements: Mapping[MatrixSpec, nn.Module],
    seed: Optional[int],
    before_init: Optional[Callable[[], None]] = None,
) -> None:
    """Swap the replacements in, give each its seed, initialize the materialized ones, route meta init.

    Each replacement's seed is :func:`matrix_seed` of ``seed`` (drawn from the global RNG if None)
    and the matrix's name; ``before_init`` runs between the swap and the initialization.
    """
    base_seed = draw_base_seed() if seed is None else int(seed)
    for spec, new in replacements.items():
        new.init_seed = matrix_seed(base_seed, spec.name)
    swap_modules(model, {spec.module: new for spec, new in replacements.items()})
    if before_init is not None:
        before_init()
    for new in replacements.values():
        if not is_meta(new):  # a meta model is initialized when Composer materializes it
            new.reset_parameters()
    types = tuple({type(new) for new in replacements.values()})
    route_param_init_fn(model, reset_modules_of(types), next(iter(replacements.values())).reparam_method)
