"""The paper's Table 1, written out per role: the oracle the init tests compare the package with.

Written independently of ``wesar_composer.roles``: one dictionary per backbone, FFN 4d (so W_d
has d_in = 4d), ``d`` the model width, ``n`` the number of layers. Roles: ``e`` embedding,
``q k v o`` attention, ``u g d`` FFN up, gate, down, ``p`` prediction head.
"""

from __future__ import annotations

import math

__all__ = ['BACKBONES', 'table1_std']

BACKBONES = ('he', 'small')


def table1_std(role: str, d: int, n: int, backbone: str) -> float:
    """The std Table 1 gives the weight of ``role`` (He or Small init), residual scaling included."""
    he = {
        'e': math.sqrt(1 / d),
        'q': math.sqrt(1 / d),
        'k': math.sqrt(1 / d),
        'v': math.sqrt(1 / d),
        'o': math.sqrt(1 / (2 * n * d)),
        'u': math.sqrt(1 / d),
        'g': math.sqrt(1 / d),
        'd': math.sqrt(2 / (8 * n * d)),
        'p': math.sqrt(1 / d),
    }
    small = {role: math.sqrt(2 / (5 * d)) for role in he}
    small.update(o=math.sqrt(2 / (10 * n * d)), d=math.sqrt(2 / (10 * n * d)))
    if backbone not in BACKBONES:
        raise ValueError(f'backbone must be one of {BACKBONES}, got {backbone!r}')
    return (he if backbone == 'he' else small)[role]
