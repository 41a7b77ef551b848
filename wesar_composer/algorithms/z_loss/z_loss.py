"""Z-loss (Chowdhery et al. 2023, PaLM) as a Composer algorithm.

    L = L_lm + weight * mean_t (log Z_t)^2,    log Z_t = logsumexp_v logits[t, v]

The mean runs over the positions the language-model loss counts: those whose target is not
llm-foundry's ignore index (-100), after the one-token shift of causal LMs, so padding and the
last position are left out exactly as the cross-entropy leaves them out. The paper uses weight
1e-4 (Tables 3 and 11); llm-foundry has no z-loss of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, cast

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import ensure_tuple
from torch.nn.parallel import DistributedDataParallel

from wesar_composer.reparam.checks import CheckedHparams, check_positive

__all__ = ['ZLoss', 'z_loss', 'loss_targets', 'add_z_loss']

DEFAULT_WEIGHT = 1e-4  # Tables 3 and 11
IGNORE_INDEX = -100  # llm-foundry's CROSS_ENTROPY_IGNORE_INDEX
LOSS_KEY = 'z_loss'  # logged by Composer as loss/train/z_loss
LM_LOSS_KEY = 'loss'  # the model's own loss, logged as loss/train/loss (llm-foundry's key for it beside 'total')


def check_weight(weight: float) -> float:
    return check_positive('z_loss weight', weight)


def z_loss(
    logits: torch.Tensor, targets: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """mean over counted positions of logsumexp(logits)^2, in float32; unweighted.

    ``logits`` is (..., vocab); ``targets`` (the shape of ``logits`` without the last dim) marks
    the positions left out with ``ignore_index``. Without ``targets`` every position counts.
    When every position is ignored the result is 0 (as llm-foundry's loss is then 0).
    """
    log_z_squared = torch.logsumexp(logits.float(), dim=-1).square()
    if targets is None:
        return log_z_squared.mean()
    if targets.shape != log_z_squared.shape:
        raise ValueError(f'targets of shape {tuple(targets.shape)} do not fit logits of shape {tuple(logits.shape)}.')
    counted = targets != ignore_index
    total = torch.where(counted, log_z_squared, torch.zeros_like(log_z_squared)).sum()
    return total / counted.sum().clamp(min=1)


def loss_targets(batch: Mapping[str, Any], shift_labels: bool = True) -> Optional[torch.Tensor]:
    """The target of every logit position, as llm-foundry's loss sees it; None without labels.

    Causal LMs (``shift_labels``) predict token t+1 at position t: targets are the labels
    shifted left by one with the last position ignored (llm-foundry's ``get_targets``; Hugging
    Face models shift the same way inside their loss).
    """
    labels = batch.get('labels') if isinstance(batch, Mapping) else None
    if labels is None:
        return None
    if not shift_labels:
        return labels
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


def add_z_loss(loss: Any, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss dict Composer back-propagates and logs: ``total`` = model loss + z, plus each part.

    A tensor (or tuple) loss becomes ``{'total', 'loss', 'z_loss'}``; a dict loss (e.g.
    llm-foundry's MoE ``{'total', 'loss', 'lbl'}``) keeps its keys and gains ``z_loss``.
    """
    parts: dict[str, torch.Tensor]
    if isinstance(loss, Mapping):
        parts = dict(loss)
        total = parts['total'] if 'total' in parts else sum(v.mean() for v in parts.values())
    else:
        total = cast(torch.Tensor, sum(v.mean() for v in ensure_tuple(loss)))
        parts = {LM_LOSS_KEY: total}
    parts[LOSS_KEY] = z
    parts['total'] = total + z
    return parts


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and 'logits' in outputs:
        return outputs['logits']
    logits = getattr(outputs, 'logits', None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f'z_loss needs the model outputs to hold logits (a tensor, a mapping with "logits" or an '
        f'object with .logits); got {type(outputs).__name__}.',
    )


class ZLoss(CheckedHparams, Algorithm):
    """Adds ``weight * mean(logsumexp(logits)^2)`` to the training loss at ``Event.AFTER_LOSS``.

    YAML: ``algorithms: {z_loss: {weight: 1.0e-4}}``. Works on llm-foundry's MPT and
    ``hf_causal_lm`` models (any model whose outputs carry ``logits``). The training loss
    becomes a dict, which Composer logs as:

    - ``loss/train/total``: the model's loss plus the z-loss term (what is back-propagated);
    - ``loss/train/loss``: the model's own loss (cross-entropy);
    - ``loss/train/z_loss``: the z-loss term, weight included.

    log Z is computed in float32 from the (possibly bf16) logits; the backward keeps that
    float32 copy of the logits, batch x sequence x vocab, for the microbatch.

    Args:
        weight: the coefficient of the z-loss (default 1e-4, the paper's).
    """

    def __init__(self, weight: float = DEFAULT_WEIGHT):
        self.weight = check_weight(weight)

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(weight={self.weight})'

    @staticmethod
    def required_on_load() -> bool:
        return False

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_LOSS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        targets = loss_targets(state.batch, shift_labels=getattr(model, 'shift_labels', True))
        z = self.weight * z_loss(_logits(state.outputs), targets)
        state.loss = add_z_loss(state.loss, z)
