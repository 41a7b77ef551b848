"""Composer callbacks for the tests: did training lower the loss on a batch it saw, and update ratios by hand.

``UpdateRatioRecorder`` copies every matrix slice before and after each optimizer step and
computes ||W_after - W_before|| / ||W_before||, the reference the monitor's keys are checked
against. ``FirstBatchLoss`` keeps the weights at ``fit_start`` (after the algorithms changed the model)
and the first training batch; at ``fit_end`` it computes the loss of that batch under the initial
and the final weights, in eval mode. A run that did not train gives two equal losses, whatever
the data. ``register_first_batch_loss()`` makes it ``callbacks: {first_batch_loss: {}}`` in a YAML.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ['FIRST_BATCH_LOSS', 'FirstBatchLoss', 'UpdateRatioRecorder', 'first_batch_loss', 'register_first_batch_loss']

FIRST_BATCH_LOSS = 'first_batch_loss'


class UpdateRatioRecorder(Callback):
    """Update ratios by hand, ``ratios[batch][key]``, with the monitor's keys (``'L0/q'``, ``'e'``)."""

    def __init__(self, model: torch.nn.Module):
        from wesar_composer.roles import find_matrices

        self.specs = find_matrices(model)
        self.before: Optional[dict[str, torch.Tensor]] = None
        self.ratios: dict[int, dict[str, float]] = {}

    def _slices(self) -> dict[str, torch.Tensor]:
        out = {}
        for spec in self.specs:
            for role, w in zip(spec.roles, spec.module.weight.detach().split(list(spec.slice_sizes))):
                out[role if spec.layer is None else f'L{spec.layer}/{role}'] = w.clone()
        return out

    def after_train_batch(self, state: State, logger: Logger) -> None:
        self.before = self._slices()

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self.before is not None
        before = self.before
        self.ratios[state.timestamp.batch.value] = {
            k: ((w - before[k]).norm() / before[k].norm()).item() for k, w in self._slices().items()
        }

    def by_key(self) -> dict[str, list[float]]:
        """Each key's ratios in batch order."""
        keys = next(iter(self.ratios.values()), {})
        return {k: [self.ratios[b][k] for b in sorted(self.ratios)] for k in keys}


class FirstBatchLoss(Callback):
    """The loss of the first training batch under the initial (``before``) and final (``after``) weights."""

    def __init__(self) -> None:
        self.initial: Optional[dict[str, torch.Tensor]] = None
        self.batch: Optional[dict[str, Any]] = None
        self.before: Optional[float] = None
        self.after: Optional[float] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.batch is None:
            self.batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.batch.items()}

    def fit_end(self, state: State, logger: Logger) -> None:
        assert self.initial is not None and self.batch is not None
        model = state.model
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        training = model.training
        model.eval()
        with torch.no_grad():
            self.after = float(model.loss(model(self.batch), self.batch))
            model.load_state_dict(self.initial)
            self.before = float(model.loss(model(self.batch), self.batch))
            model.load_state_dict(final)
        model.train(training)


def register_first_batch_loss() -> None:
    """Register ``FirstBatchLoss`` in llm-foundry's callback registry (once per process)."""
    from llmfoundry.registry import callbacks

    if FIRST_BATCH_LOSS not in callbacks.get_all():
        callbacks.register(FIRST_BATCH_LOSS, func=FirstBatchLoss)


def first_batch_loss(trainer) -> FirstBatchLoss:
    """The ``FirstBatchLoss`` instance of a trainer built from a YAML."""
    return next(c for c in trainer.state.callbacks if isinstance(c, FirstBatchLoss))
