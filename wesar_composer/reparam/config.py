"""One hyperparameter config per algorithm, validated once, with errors that name the algorithm.

An algorithm declares its hyperparameters once, as the fields of a frozen dataclass that
subclasses :class:`ReparamConfig`, and checks them in :meth:`ReparamConfig.validate`. The
functional ``apply_x(model, optimizers, **hparams)``, the Composer ``Algorithm`` (its
``__init__``, ``__repr__`` and ``apply_to``, see :class:`~wesar_composer.reparam.algorithm.ReparamAlgorithm`)
and the unknown-key message are all derived from those fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from wesar_composer.reparam.checks import check_choice, check_role_map

__all__ = ['ReparamConfig', 'INIT_MODES']

INIT_MODES = ('auto', 'reinit')  # what an algorithm can do with pretrained weights; WeSaR adds 'preserve'

C = TypeVar('C', bound='ReparamConfig')


@dataclasses.dataclass(frozen=True)
class ReparamConfig:
    """Base of every algorithm's config; the checks of ``role_map`` and ``init_mode``, which all of them have.

    Subclasses set ``method`` (the registry key), may widen ``init_modes``, declare their
    fields (``role_map`` and ``init_mode`` among them, in the order of the Algorithm's ``repr``)
    and extend :meth:`validate`. A bad value raises
    ``ValueError`` prefixed with the method, e.g. ``wesar: backbone must be one of ('he', 'small'),
    got 'big'.``
    """

    method: ClassVar[str] = ''
    init_modes: ClassVar[tuple[str, ...]] = INIT_MODES

    def __post_init__(self) -> None:
        role_map = getattr(self, 'role_map', None)
        if isinstance(role_map, Mapping):
            object.__setattr__(self, 'role_map', dict(role_map) or None)
        try:
            self.validate()
        except ValueError as error:
            raise ValueError(f'{self.method}: {error}') from None

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the bad value and what is allowed."""
        check_role_map(getattr(self, 'role_map', None))
        check_choice('init_mode', getattr(self, 'init_mode', 'auto'), self.init_modes)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls: type[C], *args: Any, **kwargs: Any) -> C:
        """The config of these hyperparameters; an unknown key raises ``TypeError`` listing the valid ones."""
        names = cls.names()
        if len(args) > len(names):
            raise TypeError(f'{cls.method} takes at most {len(names)} hyperparameters by position, got {len(args)}.')
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f'{cls.method} got unknown hyperparameter(s) {unknown}; valid ones are {names}.')
        return cls(*args, **kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """{field: value} in declaration order (the order of the Algorithm's ``repr``)."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
