"""The Composer side every model-changing algorithm of the package shares.

:class:`ReparamAlgorithm` is the Composer ``Algorithm`` shape (hyperparameters checked where
built, ``required_on_load``, an eval-able ``__repr__``) with what each of them does around its
functional ``apply_x``:

- ``Event.INIT``: decide re-initialize or preserve with the verdict of all ranks on pretrained
  weights (so that all ranks raise, or none); apply with the run's ``rank_zero_seed`` (the same
  on every rank); install the checkpoint-key checks; make llm-foundry's ``hf_checkpointer``
  export the merged model.
- ``Event.AFTER_LOAD``: compare a local sharded checkpoint's keys with the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Optional

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import FSDPConfig
from llmfoundry.callbacks import HuggingFaceCheckpointer
from torch import nn
from torch.optim import Optimizer

from wesar_composer.reparam.checkpoints import CheckedLoadPlanner, check_sharded_checkpoint, guard_model_loads
from wesar_composer.reparam.compile import make_registry_lookups_compilable
from wesar_composer.reparam.config import ReparamConfig
from wesar_composer.reparam.fold import export_merged, reparameterized_modules
from wesar_composer.reparam.pretrained import any_rank, pretrained_model_name, resolve_init_mode

__all__ = ['ReparamAlgorithm']


class ReparamAlgorithm(Algorithm):
    """Base of the algorithms that change the model at ``Event.INIT``, derived from their config.

    A subclass sets ``config_class`` (its :class:`~wesar_composer.reparam.config.ReparamConfig`)
    and ``apply_function`` (its functional form, ``apply_x(model, optimizers, seed=..., **hparams)``).
    ``__init__`` takes the config's fields (by keyword, or by position in their order) and
    validates them once; ``__repr__`` lists them (what Composer stores in a checkpoint's
    ``algorithms``); each field reads as an attribute (``WeSaR().backbone``).
    """

    config_class: ClassVar[type[ReparamConfig]] = ReparamConfig
    apply_function: ClassVar[Callable[..., nn.Module]]

    def __init__(self, *args: Any, **hparams: Any):
        self.config = self.config_class.from_kwargs(*args, **hparams)

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get('config')
        if config is not None and name in config.names():
            return getattr(config, name)
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    @property
    def method(self) -> str:
        return self.config_class.method

    @property
    def init_modes(self) -> tuple[str, ...]:
        return self.config_class.init_modes

    def __repr__(self) -> str:
        fields = ', '.join(f'{name}={value!r}' for name, value in self.config.as_kwargs().items())
        return f'{type(self).__name__}({fields})'

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event == Event.AFTER_LOAD:
            if state.fsdp_sharded_state_dict_enabled:
                check_sharded_checkpoint(state.load_path, state.model)
            return None
        make_registry_lookups_compilable()  # compile_config on Python 3.12 (see reparam.compile)
        local = pretrained_model_name(state.model) is not None
        pretrained = any_rank(local, state.device._device) if state.device is not None else local
        init_mode = resolve_init_mode(self.method, self.init_mode, state.model, self.init_modes, pretrained=pretrained)
        self.apply_to(state.model, state.optimizers, init_mode=init_mode, seed=state.rank_zero_seed)
        guard_model_loads(state.model)
        if isinstance(state.fsdp_config, FSDPConfig) and state.fsdp_config.load_planner is None:
            state.fsdp_config.load_planner = CheckedLoadPlanner()
        if reparameterized_modules(state.model):
            for callback in state.callbacks:
                if isinstance(callback, HuggingFaceCheckpointer):
                    export_merged(callback, state.model)
        return None

    def apply_to(
        self,
        model: nn.Module,
        optimizers: Optional[Sequence[Optimizer]],
        *,
        init_mode: str,
        seed: int,
    ) -> Any:
        """The functional form with this object's config, ``init_mode`` resolved for this run."""
        hparams = {**self.config.as_kwargs(), 'init_mode': init_mode}
        return type(self).apply_function(model, optimizers, seed=seed, **hparams)
