"""A Composer checkpoint of the tiny model, written by llm-foundry's own train path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ['train_and_save']


def train_and_save(tiny_train_yaml: Callable[..., Path], folder: Path, algorithms: dict) -> Path:
    """Train the tiny model 2 batches with ``algorithms``, saving to ``folder``; the batch-2 checkpoint's path.

    ``tiny_train_yaml`` is the fixture of ``tests/conftest.py``.
    """
    from llmfoundry.command_utils import train_from_yaml

    path = tiny_train_yaml(
        algorithms=algorithms, max_duration='2ba', eval_interval='2ba', save_folder=str(folder), save_interval='2ba'
    )
    train_from_yaml(str(path))
    return folder / 'ep0-ba2-rank0.pt'
