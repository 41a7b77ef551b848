"""Weight-normalized drop-in replacements for ``nn.Linear`` and llm-foundry's ``SharedEmbedding``.

Weight Normalization (Salimans and Kingma 2016; the paper's Appendix C.1) computes with
W_bar[i] = g[i] * v[i] / ||v[i]|| for every row i: the direction v (the module's ``weight``, the
actual parameter) and a trainable length g per row (``weight_g``, shape (rows, 1), as torch's
own weight norm names it). The gradient goes through the normalization:

    dL/dg[i] = G[i] . v_hat[i]          dL/dv[i] = g[i] / ||v[i]|| * (G[i] - (dL/dg[i]) v_hat[i])

with G = dL/dW_bar and v_hat = v / ||v||; dL/dv is orthogonal to v row by row.

Why not ``torch.nn.utils.parametrizations.weight_norm``: it moves the tensors to
``parametrizations.weight.original0`` / ``original1`` (state-dict keys plain MPT cannot load),
turns ``module.weight`` into a computed tensor with no ``.grad`` (the update-ratio monitor reads
the actual weight and its gradient there), leaves the module with no parameters of its own
(Composer's meta-device init then calls ``param_init_fn`` on the parametrization's submodule,
which llm-foundry's init does not know), and keeps W_bar alive from forward to backward. Here
``weight`` stays the actual parameter under its usual key, ``weight_g`` joins it, and the linear
layer's custom autograd function saves x, v and g and recomputes W_bar in backward. A fused
``Wqkv`` needs nothing special: rows are normalized one by one whatever slice they belong to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from llmfoundry.models.layers.custom_embedding import SharedEmbedding
from torch import nn

from wesar_composer.reparam.init import full_tensor, write_
from wesar_composer.reparam.modules import Reparameterized

__all__ = ['WeightNormLinear', 'WeightNormEmbedding', 'row_norms', 'weight_norm_weight']

METHOD = 'weight_norm'


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_i|| of every row, shape (rows, 1), accumulated in float32, in the weight's dtype."""
    return torch.linalg.vector_norm(weight, dim=1, keepdim=True, dtype=torch.float32).to(weight.dtype)


def reset_weight_norm(module: nn.Module) -> None:
    """v ~ N(0, weight_std^2) from the module's seed (kept if ``weight_std`` is None), g = ||v|| per row."""
    if module.weight_std is not None:
        values = module.redraw_weight(module.weight_std)
    else:
        values = full_tensor(module.weight.detach())
    write_(module.weight_g, row_norms(values))


def weight_norm_weight(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W_bar = g * v / ||v|| row by row."""
    return v * (g / row_norms(v)).to(v.dtype)


class _WeightNormLinearFunction(torch.autograd.Function):
    """y = x W_bar^T + b, W_bar = g v / ||v|| row by row, without forming W_bar.

    With s = g / ||v|| per row, y = (x v^T) * s + b (s scales y's columns, in place). Backward,
    with G = dy^T x: dL/dg = <G_i, v_i> / ||v_i|| (a batched dot product); dL/dv =
    s * G - (s dL/dg / ||v||) * v, in place on G; dL/dx = dy (s v), scaling the smaller of dy and v.
    Saves x, v, g and the row norms.
    """

    @staticmethod
    def forward(ctx, x, v, g, bias):
        norms = row_norms(v)
        ctx.save_for_backward(x, v, g, norms)
        ctx.has_bias = bias is not None
        y = F.linear(x, v)
        y.mul_((g / norms).reshape(-1).to(y.dtype))
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, v, g, norms = ctx.saved_tensors
        need_x, need_v, need_g, need_b = ctx.needs_input_grad
        compute_dtype = grad_out.dtype
        scale = (g / norms).to(v.dtype)  # (rows, 1)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_v = grad_g = grad_b = None
        if need_x:
            if flat_out.shape[0] <= v.shape[1]:  # scale whichever of dy and v is smaller
                grad_x = (grad_out * scale.reshape(-1).to(compute_dtype)) @ v.to(compute_dtype)
            else:
                grad_x = grad_out @ (v * scale).to(compute_dtype)
        if need_v or need_g:
            grad_virtual = (flat_out.t() @ x.reshape(-1, x.shape[-1]).to(compute_dtype)).to(v.dtype)
            along = torch.bmm(grad_virtual.unsqueeze(1), v.unsqueeze(2)).reshape(-1, 1) / norms  # <G_i, v_hat_i>
            if need_g:
                grad_g = along.to(g.dtype)
            if need_v:
                grad_v = grad_virtual.mul_(scale).addcmul_(v, scale * along / norms, value=-1)
        if need_b and ctx.has_bias:
            grad_b = flat_out.sum(0)
        return grad_x, grad_v, grad_g, grad_b


class WeightNormLinear(Reparameterized, nn.Linear):
    """``y = x W_bar^T + b`` with W_bar = g * v / ||v|| per row; ``weight`` is v, ``weight_g`` is g.

    ``reset_parameters`` (also what Composer calls when it materializes a meta-device model)
    draws v ~ N(0, weight_std^2) and sets g = ||v||, so W_bar = v at initialization.
    """

    reparam_method = METHOD
    FOLDED_KEYS = ('weight_g',)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_std: float | None = None,
        init_seed: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_std = weight_std
        self.init_seed = init_seed
        self.weight_g = nn.Parameter(torch.empty(out_features, 1, device=device, dtype=dtype))
        self._finish_init()

    def reset_reparameterization(self) -> None:
        reset_weight_norm(self)
        if self.bias is not None:
            write_(self.bias, torch.zeros(self.bias.shape))

    def virtual_weight(self) -> torch.Tensor:
        """W_bar = g * v / ||v||."""
        return weight_norm_weight(self.weight, self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _WeightNormLinearFunction.apply(x, self.weight, self.weight_g, self.bias))

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'weight': weight_norm_weight(tensors['weight'], tensors['weight_g'])}


class WeightNormEmbedding(Reparameterized, SharedEmbedding):
    """Token embedding with weight-normalized rows (one g per token) and embedding scaling.

    ``embedding(x) = g[x] * v[x] / ||v[x]|| * output_scale``: only the looked-up rows are
    normalized, with the gradient through their normalization. A tied head (MPT's
    ``unembed=True``) computes with the whole W_bar and no output scale.
    """

    reparam_method = METHOD
    FOLDED_KEYS = ('weight_g',)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        weight_std: float | None = None,
        output_scale: float = 1.0,
        init_seed: int | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.weight_std = weight_std
        self.init_seed = init_seed
        self.output_scale = float(output_scale)
        self.weight_g = nn.Parameter(torch.empty(num_embeddings, 1, device=device, dtype=dtype))
        self._finish_init()

    def reset_reparameterization(self) -> None:
        reset_weight_norm(self)  # no zero padding row: its norm would be 0

    def virtual_weight(self) -> torch.Tensor:
        return weight_norm_weight(self.weight, self.weight_g)

    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        if unembed:
            return cast(torch.Tensor, _WeightNormLinearFunction.apply(input, self.weight, self.weight_g, None))
        rows = F.embedding(input, self.weight, self.padding_idx)
        gains = F.embedding(input, self.weight_g, self.padding_idx)
        norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        return rows * (gains / norms * self.output_scale)

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'weight': weight_norm_weight(tensors['weight'], tensors['weight_g']) * self.output_scale}

    def unembed_factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        return 1.0 / self.output_scale

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, output_scale={self.output_scale:.4g}'
