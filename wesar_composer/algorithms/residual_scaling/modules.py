"""residual_scaling's module: a residual writer (W_o, W_d) with the branch scale 1/sqrt(2N) in its forward."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wesar_composer.reparam.init import init_matrix
from wesar_composer.reparam.modules import Reparameterized

__all__ = ['ResidualScaledLinear', 'METHOD']

METHOD = 'residual_scaling'


class ResidualScaledLinear(Reparameterized, nn.Linear):
    """``y = (x W^T + b) * residual_scale``: a residual writer (W_o, W_d) with the branch scale in its forward.

    ``residual_scale`` is a constant (1 / sqrt(2N)), kept as a plain attribute: the state dict
    has the keys of the plain ``nn.Linear``. ``reset_parameters`` draws W from the std paper_init
    recorded on the module (the backbone's, without 1/sqrt(2N)).
    """

    reparam_method = METHOD

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        residual_scale: float = 1.0,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.residual_scale = float(residual_scale)

    def reset_parameters(self) -> None:
        if not init_matrix(self):
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).mul_(self.residual_scale)  # in place: no second activation

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        folded = {'weight': tensors['weight'] * self.residual_scale}
        if tensors.get('bias') is not None:
            folded['bias'] = tensors['bias'] * self.residual_scale
        return folded

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, residual_scale={self.residual_scale:.4g}'
