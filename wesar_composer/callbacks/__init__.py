"""Composer callbacks of wesar-composer, one per file.

The callbacks load on first use (PEP 562), so that ``wesar_composer.callbacks.keys`` can be read
by the plotting tool without importing Composer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    'LossSpikeCounter': 'wesar_composer.callbacks.loss_spike_counter',
    'SpikeGuard': 'wesar_composer.callbacks.spike_guard',
    'UpdateRatioMonitor': 'wesar_composer.callbacks.update_ratio_monitor',
}

__all__ = ['LossSpikeCounter', 'SpikeGuard', 'UpdateRatioMonitor']

if TYPE_CHECKING:
    from wesar_composer.callbacks.loss_spike_counter import LossSpikeCounter
    from wesar_composer.callbacks.spike_guard import SpikeGuard
    from wesar_composer.callbacks.update_ratio_monitor import UpdateRatioMonitor


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
