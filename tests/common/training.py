"""Training the tests' models: a plain loop of optimizer steps, and a quiet Composer Trainer on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from composer import Trainer
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from tests.common.datasets import TokenBatches

__all__ = ['cpu_trainer', 'train_losses']


def train_losses(
    model, optimizer: torch.optim.Optimizer, batches: Iterable[dict], forward: Optional[Callable] = None
) -> list[float]:
    """One step per batch (zero_grad, loss, backward, step); the loss of each. ``forward`` defaults to ``model``."""
    forward = forward or model
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = model.loss(forward(batch), batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def cpu_trainer(
    model, *, dataloader: Optional[DataLoader] = None, optimizer: Optional[torch.optim.Optimizer] = None, **kwargs: Any
) -> Trainer:
    """A Composer Trainer on the CPU, seed 17, no progress bar or console log.

    ``dataloader`` defaults to batches of 4 of ``TokenBatches()``, ``optimizer`` to DecoupledAdamW
    (lr 1e-3, betas 0.9 / 0.95, weight decay 1e-5); ``kwargs`` go to the Trainer.
    """
    if dataloader is None:
        dataloader = DataLoader(TokenBatches(), batch_size=4)
    if optimizer is None:
        optimizer = DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-5)
    return Trainer(
        model=model,
        train_dataloader=dataloader,
        optimizers=optimizer,
        device='cpu',
        seed=17,
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )
