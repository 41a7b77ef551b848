"""The update-ratio monitor's volume options (which families and layers get per-matrix keys) and its summaries."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol, Union, cast

from wesar_composer.callbacks.keys import FAMILIES

__all__ = ['ALL', 'LayersArg', 'check_families', 'check_layers', 'resolve_layers', 'summaries']

ALL = 'all'
SUMMARY_MAX = 'update_ratio/max'
SUMMARY_D_OVER_U = 'update_ratio/last_layer_d_over_u'
SUMMARY_MEAN = 'update_ratio/mean_{role}'  # mean over layers of one role's update ratio
LayersArg = Union[str, Sequence[int], Mapping[str, int]]
Layers = Union[str, tuple[int, ...], dict[str, int]]


def check_families(families: Any) -> tuple[str, ...]:
    if families == ALL:
        return FAMILIES
    if isinstance(families, str) or not isinstance(families, Sequence):
        raise ValueError(f"families must be 'all' or a list drawn from {list(FAMILIES)}, got {families!r}.")
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"families: unknown family {family!r}; choose from {list(FAMILIES)} or 'all'.")
    if len(set(families)) != len(families):
        raise ValueError(f'families: {list(families)!r} names a family twice.')
    return tuple(families)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layers(layers: Any) -> Layers:
    allowed = "'all', a list of layer indices such as [0, -1], or {'every': k} with k >= 1"
    if layers == ALL:
        return ALL
    if isinstance(layers, Mapping):
        if set(layers) != {'every'} or not _is_int(layers['every']) or layers['every'] < 1:
            raise ValueError(f'layers must be {allowed}, got {dict(layers)!r}.')
        return {'every': layers['every']}
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f'layers must be {allowed}, got {layers!r}.')
    for layer in layers:
        if not _is_int(layer):
            raise ValueError(f'layers: {layer!r} is not a layer index; layers must be {allowed}.')
    return tuple(layers)


def resolve_layers(layers: Layers, present: list[int]) -> set[int]:
    """The model's layers that ``layers`` selects; an index outside the model is an error."""
    if layers == ALL:
        return set(present)
    if not present:
        return set()
    n = len(present)
    if isinstance(layers, dict):
        return set(present[:: layers['every']]) | {present[-1]}
    chosen = set()
    for layer in cast(tuple[int, ...], layers):  # not ALL, not a dict
        if not -n <= layer < n:
            raise ValueError(
                f'layers: {layer} is outside the model, which has {n} layers '
                f'(0 to {n - 1}, or -{n} to -1 counting back from the last).',
            )
        chosen.add(present[layer])
    return chosen


class _Layered(Protocol):
    layer: Optional[int]
    keys: tuple[str, ...]
    roles: tuple[str, ...]


def summaries(matrices: Sequence[_Layered], keys: list[str], ratios: list[float]) -> dict[str, float]:
    """The largest ratio, the last layer's d/u gap and each layered role's mean over all layers."""
    by_key = dict(zip(keys, ratios))
    out = {SUMMARY_MAX: max(ratios)}
    last = max((m.layer for m in matrices if m.layer is not None), default=None)
    d_ratio, u_ratio = by_key.get(f'L{last}/d'), by_key.get(f'L{last}/u')
    if d_ratio is not None and u_ratio:
        out[SUMMARY_D_OVER_U] = d_ratio / u_ratio
    per_role: dict[str, list[float]] = {}
    for m in matrices:
        if m.layer is not None:
            for key, role in zip(m.keys, m.roles):
                per_role.setdefault(role, []).append(by_key[key])
    for role, values in per_role.items():
        out[SUMMARY_MEAN.format(role=role)] = statistics.fmean(values)
    return out
