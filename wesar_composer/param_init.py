"""Routing llm-foundry's ``param_init_fn`` so a meta-device model gets this package's init.

Composer materializes a model built on the meta device (``init_device: meta`` under FSDP)
module by module: it moves each module's own parameters off meta and calls
``obj.param_init_fn(module)`` on it (llm-foundry's MPT has one), or the module's
``reset_parameters``. Algorithms that run at ``Event.INIT`` see the model while it is
still on meta, so they route every ``param_init_fn`` of the model through a handler:
the handler initializes the modules it owns and returns True; any other module goes to
the original function.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from wesar_composer.roles import unwrap

__all__ = ['route_param_init_fn', 'is_meta']

ROUTED_ATTR = '_wesar_composer_routes'  # the handlers' tags a routed param_init_fn carries


def is_meta(module: nn.Module) -> bool:
    """Whether any of the module's own parameters still lives on the meta device."""
    return any(p.is_meta for p in module.parameters(recurse=False))


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
