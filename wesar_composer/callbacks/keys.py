"""Metric keys shared by the callbacks and ``wesar-plot``; no heavy imports (the plotting tool reads them)."""

from __future__ import annotations

import re

__all__ = ['FAMILIES', 'LAYER_KEY', 'LOSS_KEY', 'matrix_key']

LOSS_KEY = 'loss/train/total'  # Composer's training loss of a batch, averaged over ranks
FAMILIES = ('update_ratio', 'param_norm', 'grad_norm', 'gate')  # the monitor's per-matrix key families
LAYER_KEY = re.compile(r'^update_ratio/L(\d+)/([a-z])$')  # a layered matrix's update ratio: layer, role


def matrix_key(layer: int | None, role: str) -> str:
    """The key suffix of one matrix (slice): ``'L3/q'``, or the role alone for e and p."""
    return role if layer is None else f'L{layer}/{role}'
