"""What the compared reparameterizations (Table 4 / 6) share: checks, surgery, optimizer groups.

Weight Normalization, sigma-Reparam and residual scaling are alternatives to WeSaR and to the
paper_init baselines, not additions: each refuses a model that already carries one of them.
Every check runs before the model changes.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from composer.utils import module_surgery
from torch import nn
from torch.optim import Optimizer

from wesar_composer.roles import unwrap

__all__ = [
    'REPARAMETERIZED',
    'applied_method',
    'check_unreparameterized',
    'swap_modules',
    'add_param_group',
    'LLMFOUNDRY_MARKERS',
]

LLMFOUNDRY_MARKERS = ('_fused', '_is_residual', '_fsdp_wrap')  # llm-foundry's module attributes for init and FSDP

# Module classes that mark a method as applied, keyed by the method's algorithm name. The
# classes of this package's algorithms register themselves here when their modules are imported.
REPARAMETERIZED: dict[type, str] = {}


def applied_method(model: nn.Module) -> Optional[tuple[str, str]]:
    """(algorithm name, module name) of the first module showing that a method was applied, or None."""
    from wesar_composer.algorithms.paper_init.paper_init import INIT_ATTR
    from wesar_composer.algorithms.paper_init.scaled_embedding import ScaledEmbedding
    from wesar_composer.algorithms.wesar.wesar import GATED_MODULES

    modules = list(unwrap(model).named_modules())
    for name, module in modules:  # first: residual_scaling also carries paper_init's marks
        for cls, method in REPARAMETERIZED.items():
            if isinstance(module, cls):
                return method, name
    for name, module in modules:
        if isinstance(module, GATED_MODULES):
            return 'wesar', name
        if isinstance(module, ScaledEmbedding) or hasattr(module, INIT_ATTR):
            return 'paper_init', name
    return None


def check_unreparameterized(model: nn.Module, method: str) -> None:
    found = applied_method(model)
    if found is not None:
        other, name = found
        if other == method:
            raise ValueError(f'{method} is already applied to this model (module {name!r}).')
        raise ValueError(
            f'{method} is an alternative to {other}, not an addition: this model already has {other} '
            f'(module {name!r}). Keep one of them in `algorithms`.',
        )


def swap_modules(model: nn.Module, replacements: Mapping[nn.Module, nn.Module]) -> None:
    """Put each replacement in place of its module with Composer's module surgery.

    The replacements share their weight ``Parameter`` with the module they replace, so the
    optimizer llm-foundry built before the Trainer and any weight tying stay intact.
    """
    for old, new in replacements.items():
        for attr in LLMFOUNDRY_MARKERS:
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
    policies = {cls: (lambda m, _: replacements.get(m)) for cls in (nn.Linear, nn.Embedding)}
    module_surgery.replace_module_classes(unwrap(model), policies=policies)


def add_param_group(optimizer: Optimizer, params: Iterable[nn.Parameter], weight_decay: float) -> None:
    """New parameters get a param group of their own: the first group's settings, their own weight decay."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != 'params'}
    group.update(params=list(params), weight_decay=weight_decay)
    optimizer.add_param_group(group)
