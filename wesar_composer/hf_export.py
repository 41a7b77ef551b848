"""Hugging Face export through llm-foundry's ``hf_checkpointer`` of a model this package changed.

The checkpointer builds a plain model from the config and loads the gathered state dict into
it. An algorithm whose modules a plain model lacks (gates, embedding scaling) folds them
into that state dict on the way out, through state-dict hooks active only while the
checkpointer gathers it, and edits the exported config where the fold needs it. Composer's
own checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import nn

__all__ = ['state_dict_hooks', 'fold_on_hf_export']

StateDictHook = Callable[[nn.Module, dict[str, Any], str], dict[str, Any]]


@contextlib.contextmanager
def state_dict_hooks(model: nn.Module, module_types: tuple[type, ...], hook: StateDictHook) -> Iterator[None]:
    """Inside the block, ``hook`` edits the state dict of every module of ``module_types``."""
    handles = [m._register_state_dict_hook(hook) for m in model.modules() if isinstance(m, module_types)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fold_on_hf_export(
    checkpointer: Any,
    module_types: tuple[type, ...],
    hook: StateDictHook,
    edit_config: Callable[[Any], Any],
) -> None:
    """Make an llm-foundry ``HuggingFaceCheckpointer`` export the folded model.

    ``hook`` folds a module's extras into its state-dict entries; ``edit_config(config)``
    returns the exported config (after the checkpointer's own transform).
    """
    get_hf_model = checkpointer._get_hf_model
    transform_config = checkpointer.transform_config

    def _get_hf_model(state):
        with state_dict_hooks(state.model, module_types, hook):
            return get_hf_model(state)

    def _transform_config(original_config):
        return edit_config(transform_config(original_config))

    checkpointer._get_hf_model = _get_hf_model
    checkpointer.transform_config = _transform_config
