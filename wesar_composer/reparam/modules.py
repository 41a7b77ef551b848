"""The reparameterized-module protocol, "which method is applied", and the scaled linear function.

Every replacement module of an algorithm (``GatedLinear``, ``WeightNormEmbedding``, ...) is a
:class:`Reparameterized`: it names its method (``reparam_method``), the plain class it
replaced (``plain_class``, set by :func:`~wesar_composer.reparam.surgery.adopt`), and how it
folds back into that class (``fold_tensors``, ``FOLDED_KEYS``, ``unembed_factor``), which is
all :mod:`wesar_composer.reparam.fold` needs to merge or export any of them. A plain module an
algorithm only marks (paper_init's matrices) carries ``reparam_method`` as an attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wesar_composer.roles import unwrap

__all__ = ['Reparameterized', 'ScaledLinearFunction', 'expand_rows', 'applied_method', 'check_unreparameterized']


class Reparameterized:
    """Mixin of every replacement module; put it first: ``class GatedLinear(Reparameterized, nn.Linear)``.

    Subclasses set ``reparam_method``, call :meth:`_finish_init` at the end of ``__init__`` and
    implement :meth:`reset_reparameterization` (what ``reset_parameters`` does once the module is
    built: the base class constructor calls ``reset_parameters`` before the extra tensors exist).
    """

    reparam_method: str = ''
    FOLDED_KEYS: tuple[str, ...] = ()  # state-dict keys of this module that the plain module lacks
    plain_class: type

    def _finish_init(self) -> None:
        self._reparam_built = True

    def reset_parameters(self) -> None:
        if not getattr(self, '_reparam_built', False):
            return super().reset_parameters()  # type: ignore[misc]
        self.reset_reparameterization()

    def reset_reparameterization(self) -> None:
        raise NotImplementedError

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain module's ``weight`` (and ``bias``) from this module's own state-dict tensors."""
        raise NotImplementedError

    def unembed_factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """For an embedding that is also the prediction head: head weight / folded embedding weight."""
        raise NotImplementedError


def expand_rows(scales: torch.Tensor, slice_sizes: Sequence[int]) -> torch.Tensor:
    """One scale per output row, shape (rows, 1), from one scale per row slice."""
    if len(slice_sizes) == 1:
        return scales.reshape(1, 1)
    return torch.cat([s.expand(n) for s, n in zip(scales.unbind(), slice_sizes)]).unsqueeze(1)


class ScaledLinearFunction(torch.autograd.Function):
    """y = x (s * W)^T + b with a row scale s, saving x, W and s (not s * W) for backward.

    Backward: dL/dW_bar = dy^T x; dL/dW = s * dL/dW_bar; dL/ds = sum_in(dL/dW_bar * W);
    dL/dx = dy (s * W), with s * W recomputed. Matmuls run in the dtype of dy, which is the
    autocast dtype when the forward ran under autocast. WeSaR's gates and sigma-Reparam's
    a / sigma are such a scale.
    """

    @staticmethod
    def forward(ctx, x, weight, row_scales, bias):
        ctx.save_for_backward(x, weight, row_scales)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * row_scales, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, row_scales = ctx.saved_tensors
        need_x, need_w, need_s, need_b = ctx.needs_input_grad
        compute_dtype = grad_out.dtype
        grad_x = grad_w = grad_s = grad_b = None
        if need_x:
            grad_x = grad_out @ (weight * row_scales).to(compute_dtype)
        if need_w or need_s:
            flat_out = grad_out.reshape(-1, grad_out.shape[-1])
            grad_virtual = (flat_out.t() @ x.reshape(-1, x.shape[-1]).to(compute_dtype)).to(weight.dtype)
            if need_w:
                grad_w = grad_virtual * row_scales
            if need_s:
                grad_s = (grad_virtual * weight).sum(dim=1, keepdim=True)
                if row_scales.shape[0] == 1:
                    grad_s = grad_s.sum(dim=0, keepdim=True)
        if need_b and ctx.has_bias:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_s, grad_b


def applied_method(model: nn.Module) -> Optional[tuple[str, str]]:
    """(algorithm name, module name) of the first module an algorithm of this package changed, or None."""
    for name, module in unwrap(model).named_modules():
        method = getattr(module, 'reparam_method', '')
        if method:
            return method, name
    return None


def check_unreparameterized(model: nn.Module, method: str) -> None:
    """Refuse a model that an algorithm of this package (this one or another) already changed."""
    found = applied_method(model)
    if found is None:
        return
    other, name = found
    if other == method:
        raise ValueError(f'{method} is already applied to this model (module {name!r}).')
    raise ValueError(
        f'{method} is an alternative to {other}, not an addition: this model already has {other} '
        f'(module {name!r}). Keep one of them in `algorithms`.',
    )
