"""What every algorithm of the package does inside a Composer Trainer, around its ``apply_x``.

- ``Event.INIT``, before the surgery: :func:`run_init_mode` decides re-initialize or preserve
  with the verdict of all ranks on pretrained weights (so that all ranks raise, or none), and
  the base seed is the run's ``rank_zero_seed`` (the same on every rank).
- ``Event.INIT``, after it: :func:`guard_checkpoints` installs the checkpoint-key checks.
- ``Event.AFTER_LOAD``: :func:`check_loaded_checkpoint` compares a local sharded
  checkpoint's keys with the model's.
"""

from __future__ import annotations

from composer.core import State
from composer.utils import FSDPConfig

from wesar_composer.reparam.checkpoints import CheckedLoadPlanner, check_sharded_checkpoint, guard_model_loads
from wesar_composer.reparam.checks import INIT_MODES
from wesar_composer.reparam.pretrained import any_rank, pretrained_model_name, resolve_init_mode

__all__ = ['run_init_mode', 'guard_checkpoints', 'check_loaded_checkpoint']


def run_init_mode(state: State, method: str, init_mode: str, modes: tuple[str, ...] = INIT_MODES) -> str:
    """'reinit' or 'preserve' for the run's model, decided alike on every rank."""
    local = pretrained_model_name(state.model) is not None
    pretrained = any_rank(local, state.device._device) if state.device is not None else local
    return resolve_init_mode(method, init_mode, state.model, modes, pretrained=pretrained)


def guard_checkpoints(state: State) -> None:
    """Checkpoint loads of this run compare the checkpoint's reparameterization with the model's."""
    guard_model_loads(state.model)
    if isinstance(state.fsdp_config, FSDPConfig) and state.fsdp_config.load_planner is None:
        state.fsdp_config.load_planner = CheckedLoadPlanner()


def check_loaded_checkpoint(state: State) -> None:
    if state.fsdp_sharded_state_dict_enabled:
        check_sharded_checkpoint(state.load_path, state.model)
