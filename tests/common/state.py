"""A model's state dict copied before a call, and the check that the call left it as it was."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ['assert_unchanged', 'snapshot']


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model``'s state dict."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """``model`` has the keys of ``before`` and every tensor equal to its copy there."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
