"""One row per algorithm of the package: what the parametrized tests of ``test_algorithms.py`` need.

Each row names the functional form (``apply``), the Composer ``Algorithm`` class, the llm-foundry
registry key, the module types the algorithm installs, the state-dict entries it adds to the plain
model (by the last part of the key; ``tied_extra_state_keys`` when the head shares the embedding),
the hyperparameters the tests build it with, and hyperparameters it must refuse where it is built.
``z_loss`` changes the loss, not the model: ``apply`` is None and it adds no modules or keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Optional

import pytest

from wesar_composer import (
    PaperInit,
    ResidualScaling,
    SigmaReparam,
    WeightNorm,
    WeSaR,
    ZLoss,
    apply_paper_init,
    apply_residual_scaling,
    apply_sigma_reparam,
    apply_weight_norm,
    apply_wesar,
)
from wesar_composer.algorithms.paper_init import ScaledEmbedding
from wesar_composer.algorithms.residual_scaling import ResidualScaledLinear
from wesar_composer.algorithms.sigma_reparam import SigmaReparamEmbedding, SigmaReparamLinear
from wesar_composer.algorithms.weight_norm import WeightNormEmbedding, WeightNormLinear
from wesar_composer.algorithms.wesar import GatedEmbedding, GatedLinear


@dataclass(frozen=True)
class AlgorithmSettings:
    key: str  # the llm-foundry registry key and the YAML name
    algorithm_cls: type
    apply: Optional[Callable[..., Any]]  # the functional form; None for an algorithm that leaves the model alone
    module_types: tuple[type, ...] = ()
    extra_state_keys: frozenset[str] = frozenset()
    tied_extra_state_keys: frozenset[str] = frozenset()
    kwargs: dict[str, Any] = field(default_factory=dict)
    bad_kwargs: tuple[tuple[str, Any], ...] = ()  # (name, value) refused with a ValueError naming ``name``

    @property
    def changes_model(self) -> bool:
        return self.apply is not None

    def build(self):
        return self.algorithm_cls(**self.kwargs)


SETTINGS: dict[str, AlgorithmSettings] = {
    s.key: s
    for s in [
        AlgorithmSettings(
            key='wesar',
            algorithm_cls=WeSaR,
            apply=apply_wesar,
            module_types=(GatedLinear, GatedEmbedding),
            extra_state_keys=frozenset({'gate'}),
            tied_extra_state_keys=frozenset({'gate', 'unembed_gate'}),
            kwargs={'sigma_squared': 4e-5},
            bad_kwargs=(
                ('trainable_gates', 'yes'),
                ('embedding_scaling', 'false'),
                ('role_map', [1]),
                ('backbone', 'xavier'),
                ('sigma_squared', '4e-5'),
                ('gate_weight_decay', -1.0),
                ('init_mode', 'keep'),
            ),
        ),
        AlgorithmSettings(
            key='paper_init',
            algorithm_cls=PaperInit,
            apply=apply_paper_init,
            module_types=(ScaledEmbedding,),
            kwargs={'backbone': 'small'},
            bad_kwargs=(('embedding_scaling', 'false'), ('role_map', [1]), ('backbone', 1), ('init_mode', 'preserve')),
        ),
        AlgorithmSettings(
            key='weight_norm',
            algorithm_cls=WeightNorm,
            apply=apply_weight_norm,
            module_types=(WeightNormLinear, WeightNormEmbedding),
            extra_state_keys=frozenset({'weight_g'}),
            tied_extra_state_keys=frozenset({'weight_g'}),
            kwargs={'sigma_squared': 1.6e-4},
            bad_kwargs=(
                ('embedding_scaling', 0),
                ('sigma_squared', 0.0),
                ('gain_weight_decay', 'none'),
                ('role_map', 'x'),
            ),
        ),
        AlgorithmSettings(
            key='sigma_reparam',
            algorithm_cls=SigmaReparam,
            apply=apply_sigma_reparam,
            module_types=(SigmaReparamLinear, SigmaReparamEmbedding),
            extra_state_keys=frozenset({'gate', 'sn_sigma', 'sn_u', 'sn_v'}),
            tied_extra_state_keys=frozenset({'gate', 'sn_sigma', 'sn_u', 'sn_v', 'unembed_gate'}),
            kwargs={'sigma_squared': 6.4e-4},
            bad_kwargs=(('embedding_scaling', 'yes'), ('sigma_squared', -1), ('role_map', {1: 'u'})),
        ),
        AlgorithmSettings(
            key='residual_scaling',
            algorithm_cls=ResidualScaling,
            apply=apply_residual_scaling,
            module_types=(ResidualScaledLinear, ScaledEmbedding),
            kwargs={'backbone': 'he'},
            bad_kwargs=(('embedding_scaling', 'no'), ('backbone', 'xavier'), ('role_map', [1])),
        ),
        AlgorithmSettings(key='z_loss', algorithm_cls=ZLoss, apply=None, kwargs={'weight': 1e-4}),
    ]
}

# The algorithms the package registers with llm-foundry, as Composer derives its algorithm list
# from its registry: a registered algorithm without a row above fails test_every_registered_algorithm_has_a_row.
REGISTERED = sorted(
    ep.name for ep in entry_points(group='llmfoundry_algorithms') if ep.value.startswith('wesar_composer.')
)
ALL = [key for key in REGISTERED if key in SETTINGS]
MODEL_CHANGING = [key for key in ALL if SETTINGS[key].changes_model]


def settings_params(keys=None) -> list:
    """``pytest.param`` per registry key, with the key as the test id."""
    return [pytest.param(SETTINGS[key], id=key) for key in (keys or ALL)]
