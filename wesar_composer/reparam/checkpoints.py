"""Refuse a checkpoint whose reparameterization differs from the run's, naming the algorithm.

A reparameterized model has state-dict keys of its own: WeSaR's ``gate`` / ``unembed_gate``,
Weight Normalization's ``weight_g``, sigma-Reparam's ``gate`` with ``sn_u`` / ``sn_v`` /
``sn_sigma``. A checkpoint saved by one method and loaded into a run of another (or of none)
would otherwise load partly: gates dropped or left at their init, with nothing said. The keys
tell which method saved a checkpoint (:func:`methods_of_keys`), and three guards compare
them with the run's before any weight is used:

- monolithic checkpoints (and any ``load_state_dict`` of the model): a load pre-hook;
- FSDP1 sharded checkpoints: a load planner that reads the checkpoint's metadata;
- FSDP2 sharded checkpoints: the metadata of a local checkpoint folder, read after the load
  (a checkpoint that lacks the run's keys already fails inside torch's loader, naming the key).

paper_init and residual_scaling add no keys; their checkpoints look like plain ones.

These guards are installed by the algorithms, so they run only in a run that lists one. A run
that lists none is checked before it starts by the llm-foundry config transform in
:mod:`wesar_composer.reparam.resume_guard`, which reads the same keys from the checkpoint file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Optional

from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

__all__ = ['methods_of_keys', 'check_keys', 'guard_model_loads', 'CheckedLoadPlanner', 'check_sharded_checkpoint']

_GATE_KEYS = ('gate', 'unembed_gate')
_SPECTRAL_KEYS = ('sn_u', 'sn_v', 'sn_sigma')
GUARD_ATTR = '_wesar_composer_load_guard'


def methods_of_keys(keys: Iterable[str]) -> dict[str, str]:
    """{method: one key showing it} for the reparameterizations whose parameters appear in ``keys``."""
    keys = list(keys)
    spectral_owners = {k.rpartition('.')[0] for k in keys if k.rpartition('.')[2] in _SPECTRAL_KEYS}
    found: dict[str, str] = {}
    for key in keys:
        owner, _, leaf = key.rpartition('.')
        if leaf == 'weight_g':
            found.setdefault('weight_norm', key)
        elif leaf in _SPECTRAL_KEYS or (leaf in _GATE_KEYS and owner in spectral_owners):
            found.setdefault('sigma_reparam', key)
        elif leaf in _GATE_KEYS:
            found.setdefault('wesar', key)
    return found


def _model_keys(model: nn.Module) -> list[str]:
    """Parameter and buffer names (no state dict is built: under FSDP that would gather)."""
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def check_keys(run_keys: Iterable[str], checkpoint_keys: Iterable[str], source: str = 'the checkpoint') -> None:
    """Raise ``ValueError`` if ``checkpoint_keys`` were saved by another reparameterization than ``run_keys`` use."""
    run = methods_of_keys(run_keys)
    saved = methods_of_keys(checkpoint_keys)
    if set(run) == set(saved):
        return
    for method, key in saved.items():
        if method not in run:
            raise ValueError(
                f'{source} was saved by a run with the {method} algorithm (it has keys such as {key!r}), but this '
                f"model has no {method} parameters: loading it would drop them and change the model's outputs. "
                f'Add `algorithms: {{{method}: ...}}` with the hyperparameters of the run that saved it, or load its '
                'Hugging Face export (hf_checkpointer), which has them folded into plain weights.',
            )
    for method, key in run.items():
        raise ValueError(
            f'{source} was saved by a run without the {method} algorithm (no key such as {key!r}), but this run '
            f'has {method}: its parameters would keep their initial values. Remove {method} from `algorithms` '
            'to continue that run as it was trained'
            + (
                ', or continue its weights with WeSaR through `init_mode: preserve` on a Hugging Face export '
                '(hf_causal_lm with pretrained: true).'
                if method == 'wesar'
                else '.'
            ),
        )


def guard_model_loads(model: nn.Module) -> None:
    """Check every ``model.load_state_dict`` (Composer's monolithic checkpoint loads) with :func:`check_keys`."""
    if getattr(model, GUARD_ATTR, False):
        return

    def pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        incoming = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        check_keys(_model_keys(module), incoming)

    model.register_load_state_dict_pre_hook(pre_hook)
    setattr(model, GUARD_ATTR, True)


def _model_part(keys: Iterable[str], prefix: str = 'state.model.') -> list[str]:
    return [k[len(prefix) :] for k in keys if k.startswith(prefix)]


class CheckedLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner that first compares the checkpoint's model keys with the run's (FSDP1 sharded)."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        if metadata is not None:
            run = _model_part(_flat_keys(state_dict))
            if run:  # a model is being loaded
                check_keys(run, _model_part(metadata.state_dict_metadata), 'the sharded checkpoint')
        super().set_up_planner(state_dict, metadata, is_coordinator)


def _flat_keys(state_dict: dict[str, Any], prefix: str = '') -> list[str]:
    keys = []
    for key, value in state_dict.items():
        if isinstance(value, dict):
            keys += _flat_keys(value, f'{prefix}{key}.')
        else:
            keys.append(f'{prefix}{key}')
    return keys


def check_sharded_checkpoint(path: Optional[str], model: nn.Module) -> bool:
    """Compare a local sharded checkpoint folder's model keys with ``model``'s; False if ``path`` is not one."""
    if not path or not os.path.isdir(path) or not os.path.exists(os.path.join(path, '.metadata')):
        return False
    metadata = FileSystemReader(path).read_metadata()
    check_keys(_model_keys(model), _model_part(metadata.state_dict_metadata), f'the sharded checkpoint {path}')
    return True
