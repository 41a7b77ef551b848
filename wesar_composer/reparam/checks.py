"""Hyperparameter checks shared by every algorithm and callback of the package.

Each check names the bad value and what is allowed, and runs where the object is built
(``__init__``) and again in the functional ``apply_x`` before the model changes.
:class:`CheckedHparams` makes an unknown keyword (a YAML typo such as ``sigma: 1e-4``) fail
with the list of valid keys instead of Python's bare ``TypeError``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from composer.utils import ensure_tuple
from torch.optim import Optimizer

from wesar_composer.roles import merged_role_map

__all__ = [
    'CheckedHparams',
    'check_positive',
    'check_positive_int',
    'check_non_negative',
    'check_bool',
    'check_choice',
    'check_role_map',
    'check_optimizers',
    'Optimizers',
]


class CheckedHparams:
    """Mixin: building the class with a keyword ``__init__`` does not take raises ``TypeError`` listing the valid ones."""

    def __new__(cls, *args: Any, **kwargs: Any):
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            valid = [n for n, p in params.items() if n != 'self' and p.kind is not inspect.Parameter.VAR_POSITIONAL]
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise TypeError(f'{cls.__name__} got unknown hyperparameter(s) {unknown}; valid ones are {valid}.')
        return super().__new__(cls)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive(name: str, value: Any) -> float:
    """A positive finite number (bools and strings refused), as a float."""
    if not _is_number(value) or value <= 0:
        raise ValueError(f'{name} must be a positive finite number, got {value!r}.')
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (bools, floats and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    return value


def check_non_negative(name: str, value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """true or false only: the string 'false' is not false."""
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be true or false, got {value!r}.')
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}.')
    return value


def check_role_map(role_map: Any) -> Optional[dict[str, str]]:
    """None or ``{regex: role}`` with known roles and valid regexes."""
    if role_map is not None and not isinstance(role_map, Mapping):
        raise ValueError(f'role_map must be a mapping {{regex: role}}, got {role_map!r}.')
    if role_map is not None and not all(isinstance(k, str) for k in role_map):
        raise ValueError(f'role_map keys must be regex strings, got {list(role_map)!r}.')
    merged_role_map(role_map)  # raises on an unknown role or a bad regex
    return dict(role_map) if role_map else None


Optimizers = Optional[Union[Optimizer, Sequence[Optimizer]]]  # the ``optimizers`` argument of every ``apply_x``


def check_optimizers(method: str, optimizers: Optimizers) -> tuple[Optimizer, ...]:
    """At most one torch optimizer; a hyperparameter passed in this slot by position is an error."""
    if optimizers is None:
        return ()
    optimizers = ensure_tuple(optimizers)
    if not all(isinstance(o, Optimizer) for o in optimizers):
        raise ValueError(
            f'optimizers must be torch optimizers (or None), got {optimizers!r}; '
            f'pass hyperparameters by keyword: apply_{method}(model, optimizers, name=value).',
        )
    if len(optimizers) > 1:
        raise ValueError(f'apply_{method} supports one optimizer, got {len(optimizers)}.')
    return optimizers
