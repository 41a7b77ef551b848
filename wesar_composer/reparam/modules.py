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

from wesar_composer.reparam.init import draw_base_seed, normal_like, write_
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

    def redraw_weight(self, std: float) -> torch.Tensor:
        """W ~ N(0, std^2) from the module's own seed (taken from the global RNG once if it has none); the values."""
        if getattr(self, 'init_seed', None) is None:
            self.init_seed = draw_base_seed()
        weight = self.weight  # type: ignore[attr-defined]
        values = normal_like(weight, [std], self.init_seed)
        write_(weight, values)
        return values

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


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts a linear layer's operands to on x's device, or None outside autocast."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _columns(scales: torch.Tensor, slice_sizes: Sequence[int]) -> torch.Tensor:
    """One scale per output feature, shape (d_out,) (or (1,) for one slice): broadcasts over the last dim of y."""
    return scales.reshape(1) if len(slice_sizes) == 1 else expand_rows(scales, slice_sizes).reshape(-1)


def _slice_dots(grad: torch.Tensor, weight: torch.Tensor, slice_sizes: Sequence[int]) -> torch.Tensor:
    """<grad_slice, W_slice> for every row slice, shape (n_slices,), in the dtype of ``grad`` and ``weight``."""
    pairs = zip(grad.split(list(slice_sizes)), weight.split(list(slice_sizes)))
    return torch.stack([torch.dot(g.reshape(-1), w.reshape(-1)) for g, w in pairs])


class ScaledLinearFunction(torch.autograd.Function):
    """y = x (s W)^T + b with one scale per row slice of W (WeSaR's gates, sigma-Reparam's a / sigma).

    Low precision (under autocast, or with bf16 / fp16 parameters as FSDP's ``PURE`` computes):
    exactly ``F.linear(x, s * W)`` there, s * W rounded once to the compute dtype, at the traffic
    of a plain layer in forward. The scale goes into the cast the plain layer makes in any case:
    one ``mul`` reads W and writes the scaled low-precision copy, which is kept for dL/dx as
    autocast's linear keeps its cast of W; x is cast and saved as autocast saves it. Backward
    computes G = dy^T x (the virtual weight's gradient) in the compute dtype, and:

    - dL/dW = s * G in one ``mul`` that reads G and writes the full-precision gradient, the
      traffic of the cast back that a plain autocast layer does;
    - dL/ds = <G_slice, W_slice> per slice. With ``scales_nonzero`` (the caller knows no scale
      is exactly 0) it is <dL/dW_slice, W_slice> / s: one read of W and of dL/dW. Otherwise G is
      first cast to W's dtype (dL/ds without a division; dL/dW = s * G in place after), which
      costs two more passes over a weight-sized tensor. A stale ``scales_nonzero`` with a zero
      scale gives a NaN gradient, not a wrong one.

    Full precision without autocast (the CPU runs): s * W is one of three products that give the
    same result, (s x) W^T, x (s W)^T and (x W^T) s, and each product scales the smallest of
    input, weight and output (a per-slice s cannot scale x); backward scales G in place.
    """

    @staticmethod
    def forward(ctx, x, weight, scales, bias, slice_sizes, scales_nonzero=False):
        ctx.slice_sizes = tuple(slice_sizes)
        ctx.has_bias = bias is not None
        ctx.scales_nonzero = bool(scales_nonzero)
        cast = _autocast_dtype(x)
        if cast is None and weight.dtype in (torch.bfloat16, torch.float16):
            cast = weight.dtype
        ctx.low_precision = cast is not None
        if cast is not None:
            x_cast = x.to(cast)
            scaled = torch.empty(weight.shape, dtype=cast, device=weight.device)
            torch.mul(weight, expand_rows(scales, ctx.slice_sizes), out=scaled)  # (s * W) rounded once
            ctx.save_for_backward(x_cast, weight, scales, scaled)
            return F.linear(x_cast, scaled, None if bias is None else bias.to(cast))
        tokens, (d_out, d_in) = x.numel() // x.shape[-1], weight.shape
        one = len(ctx.slice_sizes) == 1
        sizes = {'y': tokens * d_out, 'w': d_out * d_in, 'x': tokens * d_in if one else float('inf')}
        smallest = min(sizes, key=sizes.__getitem__)
        ctx.save_for_backward(x, weight, scales)
        if smallest == 'y':
            y = F.linear(x, weight)
            y.mul_(_columns(scales, ctx.slice_sizes).to(y.dtype))
            return y if bias is None else y.add_(bias.to(y.dtype))
        if smallest == 'x':
            return F.linear(x * scales.to(x.dtype), weight, bias)
        return F.linear(x, weight * expand_rows(scales, ctx.slice_sizes).to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # x (as computed with), W, s (and the scaled low-precision W)
        x, weight, scales = saved[:3]
        sizes = ctx.slice_sizes
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.low_precision:
            compute = saved[3].dtype
            flat_out = flat_out.to(compute)
            if need_x:
                grad_x = flat_out @ saved[3]
                grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1])
            if need_w or need_s:
                grad_virtual = flat_out.t() @ x.reshape(-1, x.shape[-1])
                grad_w, grad_s = _weight_and_scale_grads(
                    grad_virtual, weight, scales, sizes, need_s, ctx.scales_nonzero
                )
        else:
            compute_dtype = grad_out.dtype
            if need_x:
                grad_x = _full_precision_grad_x(grad_out, flat_out, weight, scales, sizes)
            if need_w or need_s:
                grad_virtual = (flat_out.t() @ x.reshape(-1, x.shape[-1]).to(compute_dtype)).to(weight.dtype)
                if need_s:
                    grad_s = _slice_dots(grad_virtual, weight, sizes)
                grad_w = grad_virtual.mul_(expand_rows(scales, sizes).to(grad_virtual.dtype))
        if grad_s is not None:
            grad_s = grad_s.to(scales.dtype).reshape(scales.shape)
        if need_b and ctx.has_bias:
            grad_b = flat_out.sum(0)
        return grad_x, grad_w if need_w else None, grad_s, grad_b, None, None


def _weight_and_scale_grads(
    grad_virtual: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    sizes: Sequence[int],
    need_s: bool,
    scales_nonzero: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dL/dW = s * G in W's dtype and dL/ds = <G, W> per slice, from G in the compute dtype."""
    rows = expand_rows(scales, sizes)
    if not need_s:
        return torch.mul(grad_virtual, rows).to(weight.dtype), None
    if scales_nonzero:
        grad_w = torch.mul(grad_virtual, rows).to(weight.dtype)  # one pass: reads G, writes s * G
        return grad_w, _slice_dots(grad_w, weight, sizes) / scales.reshape(-1).to(grad_w.dtype)
    grad_virtual = grad_virtual.to(weight.dtype)
    grad_s = _slice_dots(grad_virtual, weight, sizes)
    return grad_virtual.mul_(rows.to(grad_virtual.dtype)), grad_s


def _full_precision_grad_x(grad_out, flat_out, weight, scales, sizes) -> torch.Tensor:
    """dL/dx = dy (s W), scaling the smallest of dL/dx, dy and W."""
    compute_dtype = grad_out.dtype
    tokens, (d_out, d_in) = flat_out.shape[0], weight.shape
    one = len(sizes) == 1
    options = {'dx': tokens * d_in if one else float('inf'), 'dy': tokens * d_out, 'w': d_out * d_in}
    smallest = min(options, key=options.__getitem__)
    if smallest == 'dx':
        return (grad_out @ weight.to(compute_dtype)).mul_(scales.to(compute_dtype))
    if smallest == 'dy':
        return (grad_out * _columns(scales, sizes).to(compute_dtype)) @ weight.to(compute_dtype)
    return grad_out @ (weight * expand_rows(scales, sizes).to(weight.dtype)).to(compute_dtype)


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
