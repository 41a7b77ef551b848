"""Trained weights: refuse to re-initialize them silently.

Every algorithm of this package draws new weights at ``Event.INIT``. On a model whose weights
were loaded with ``from_pretrained`` (llm-foundry's ``hf_causal_lm`` with ``pretrained: true``)
that discards them. Such a model is recognized as a Hugging Face ``PreTrainedModel`` in eval
mode with materialized weights: ``from_pretrained`` returns its model in eval mode, a model
built from a config stays in training mode (and Composer switches to training mode only when
``fit`` starts). ``init_mode`` says what to do:

- ``auto`` (default): re-initialize a freshly built model; refuse a pretrained one, naming the options;
- ``reinit``: re-initialize whatever the weights (the pretrained ones are discarded, and the log says so);
- ``preserve`` (WeSaR only): reparameterize the trained weights without changing the outputs.
"""

from __future__ import annotations

import logging

import torch
from composer.utils import dist
from torch import nn

from wesar_composer.reparam.checks import check_choice

log = logging.getLogger(__name__)

__all__ = ['pretrained_model_name', 'resolve_init_mode', 'any_rank']


def pretrained_model_name(model: nn.Module) -> str | None:
    """Class and path of the first ``from_pretrained`` model inside ``model``, or None."""
    from transformers.modeling_utils import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not module.training:
            if any(p.is_meta for p in module.parameters()):
                return None
            return f'{type(module).__name__} from {getattr(module, "name_or_path", "") or "a checkpoint"!r}'
    return None


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (a no-op on one process)."""
    if dist.get_world_size() <= 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, reduce_operation='MAX')
    return bool(tensor.item())


def resolve_init_mode(
    method: str,
    init_mode: str,
    model: nn.Module,
    modes: tuple[str, ...],
    pretrained: bool | None = None,
) -> str:
    """'reinit' or 'preserve' for ``model``; raises for 'auto' on a pretrained model.

    ``pretrained`` overrides the detection (the Composer algorithm passes the verdict of all ranks).
    """
    check_choice('init_mode', init_mode, modes)
    name = pretrained_model_name(model)
    if pretrained is None:
        pretrained = name is not None
    if init_mode == 'auto' and pretrained:
        preserve = (
            "init_mode: preserve to keep the model's function (continued pre-training), " if 'preserve' in modes else ''
        )
        raise ValueError(
            f'{method}: the model holds pretrained weights ({name or "loaded on rank 0"}); re-initializing would '
            f'discard them. Set {preserve}init_mode: reinit to discard them and start from {method} init, or '
            'build the model with pretrained: false.',
        )
    if init_mode == 'auto':
        return 'reinit'
    if init_mode == 'reinit' and pretrained:
        log.warning('%s: init_mode reinit discards the pretrained weights of %s.', method, name)
    return init_mode
