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


class ScaledLinearFunction(torch.autograd.Function):
    """y = x (s W)^T + b with one scale per row slice of W, scaling the smallest operand each time.

    s * W is one of three products that give the same result: (s x) W^T, x (s W)^T and
    (x W^T) s, with s scaling the input, the weight, or the output (in place). Each product
    picks the smallest of these (x is T x d_in, W d_out x d_in, y T x d_out for T tokens; a
    per-slice s cannot scale x); backward does the same for dL/dx = dy (s W), and:

    - dL/dW = s * G in place on G = dy^T x (the virtual weight's gradient, needed in any case);
    - dL/ds = <G_slice, W_slice> per slice (a dot product, no temporary).

    Without autocast only x, W and s are saved. Under autocast, when W is the smallest operand,
    the scale goes onto the low-precision copy of W that autocast makes in any case (in place),
    and that copy is kept for dL/dx, as autocast's own linear keeps its cast of W: no
    full-precision s * W, no second product in backward, the same saved memory as a plain
    layer. Matmuls run in the dtype of dy (the autocast dtype when the forward ran under
    autocast). WeSaR's gates and sigma-Reparam's a / sigma are such a scale.
    """

    @staticmethod
    def forward(ctx, x, weight, scales, bias, slice_sizes):
        ctx.slice_sizes = tuple(slice_sizes)
        ctx.has_bias = bias is not None
        ctx.scaled_weight = False
        tokens, (d_out, d_in) = x.numel() // x.shape[-1], weight.shape
        one = len(ctx.slice_sizes) == 1
        sizes = {'y': tokens * d_out, 'w': d_out * d_in, 'x': tokens * d_in if one else float('inf')}
        smallest = min(sizes, key=sizes.__getitem__)
        cast = _autocast_dtype(x)
        if smallest == 'w' and cast is not None and cast != weight.dtype:
            scaled = weight.to(cast).mul_(expand_rows(scales, ctx.slice_sizes).to(cast))  # autocast's cast, scaled
            ctx.save_for_backward(x, weight, scales, scaled)
            ctx.scaled_weight = True
            return F.linear(x, scaled, bias)
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
        saved = ctx.saved_tensors  # x, W, s (and the scaled low-precision W under autocast)
        x, weight, scales = saved[:3]
        sizes = ctx.slice_sizes
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        compute_dtype = grad_out.dtype
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_s = grad_b = None
        if need_x and ctx.scaled_weight:
            grad_x = grad_out @ saved[3].to(compute_dtype)
        elif need_x:
            tokens, (d_out, d_in) = flat_out.shape[0], weight.shape
            one = len(sizes) == 1
            options = {'dx': tokens * d_in if one else float('inf'), 'dy': tokens * d_out, 'w': d_out * d_in}
            smallest = min(options, key=options.__getitem__)
            if smallest == 'dx':
                grad_x = (grad_out @ weight.to(compute_dtype)).mul_(scales.to(compute_dtype))
            elif smallest == 'dy':
                grad_x = (grad_out * _columns(scales, sizes).to(compute_dtype)) @ weight.to(compute_dtype)
            else:
                grad_x = grad_out @ (weight * expand_rows(scales, sizes).to(weight.dtype)).to(compute_dtype)
        if need_w or need_s:
            grad_virtual = (flat_out.t() @ x.reshape(-1, x.shape[-1]).to(compute_dtype)).to(weight.dtype)
            if need_s:
                pairs = zip(grad_virtual.split(list(sizes)), weight.split(list(sizes)))
                grad_s = torch.stack([torch.dot(g.reshape(-1), w.reshape(-1)) for g, w in pairs]).to(scales.dtype)
                grad_s = grad_s.reshape(scales.shape)
            if need_w:
                grad_w = grad_virtual.mul_(expand_rows(scales, sizes).to(grad_virtual.dtype))
        if need_b and ctx.has_bias:
            grad_b = flat_out.sum(0)
        return grad_x, grad_w, grad_s, grad_b, None


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
