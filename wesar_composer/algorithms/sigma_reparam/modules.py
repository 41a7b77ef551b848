"""sigma-Reparam drop-in replacements for ``nn.Linear`` and llm-foundry's ``SharedEmbedding``.

sigma-Reparam (Zhai et al. 2023; the paper's Appendix C.2) computes with
W_bar = a / ||W||_2 * W: a trainable scalar a (``gate``, initialized to 1) over the spectral
norm of the actual W. ||W||_2 is estimated by power iteration on persistent buffers
(``sn_u``: left singular vector, ``sn_v``: right singular vector, ``sn_sigma``: the estimate),
one iteration per training step, and is not differentiated: dL/dW = a / sigma * dL/dW_bar.

- The buffers start at the exact top singular triple (an SVD at ``reset_parameters``, also when
  Composer materializes a meta-device model), so the estimate is exact at step 0.
- One iteration per step: :func:`request_power_iteration` (the ``SigmaReparam`` algorithm calls
  it at ``Event.BATCH_START``) marks every module; the first training-mode forward after that
  iterates once (v <- W^T u / ||.||, u <- W v / ||.||, sigma = ||W v||) in float32. Later
  micro-batches of the same step, activation-checkpoint recomputation and eval forwards use
  the stored estimate, so every forward of one step sees the same sigma.
- A fused ``Wqkv`` has one a and one spectral norm per q / k / v slice: the paper's matrices
  are W_q, W_k and W_v.

The linear layer uses the package's scaled linear function (the per-slice scale a / sigma plays
the role of WeSaR's gate), so W_bar is recomputed in backward instead of being held from the forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from llmfoundry.models.layers.custom_embedding import SharedEmbedding
from torch import nn

from wesar_composer.reparam.init import full_tensor, write_
from wesar_composer.reparam.modules import Reparameterized, ScaledLinearFunction, expand_rows

__all__ = ['SigmaReparamLinear', 'SigmaReparamEmbedding', 'request_power_iteration', 'SPECTRAL_BUFFERS']

METHOD = 'sigma_reparam'

SPECTRAL_BUFFERS = ('sn_u', 'sn_v', 'sn_sigma')


class _SpectralNorm:
    """Power-iteration state of ``self.weight``, one singular triple per row slice (mixin)."""

    slice_sizes: tuple[int, ...]
    weight: nn.Parameter
    power_iteration_pending: bool

    def _init_spectral_buffers(self, rows: int, cols: int, device) -> None:
        n = len(self.slice_sizes)
        self.register_buffer('sn_u', torch.zeros(rows, device=device, dtype=torch.float32))
        self.register_buffer('sn_v', torch.zeros(n, cols, device=device, dtype=torch.float32))
        self.register_buffer('sn_sigma', torch.ones(n, device=device, dtype=torch.float32))
        self.power_iteration_pending = False

    @torch.no_grad()
    def reset_spectral_norm(self) -> None:
        """Exact top singular triple of every slice (SVD)."""
        weight = full_tensor(self.weight.detach()).float()
        for i, (w, u) in enumerate(zip(weight.split(list(self.slice_sizes)), self.sn_u.split(list(self.slice_sizes)))):
            left, singular, right_h = torch.linalg.svd(w, full_matrices=False)
            u.copy_(left[:, 0])
            self.sn_v[i].copy_(right_h[0])
            self.sn_sigma[i] = singular[0]

    @torch.no_grad()
    def power_iteration(self) -> None:
        """One power iteration per slice: v <- W^T u / ||W^T u||, u <- W v / ||W v||, sigma = ||W v||."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            weight = self.weight.detach().float()
            for i, (w, u) in enumerate(
                zip(weight.split(list(self.slice_sizes)), self.sn_u.split(list(self.slice_sizes)))
            ):
                v = F.normalize(w.t() @ u.float(), dim=0)  # buffers may be cast (FSDP mixed precision)
                wv = w @ v
                sigma = torch.linalg.vector_norm(wv)
                u.copy_(wv / sigma)
                self.sn_v[i].copy_(v)
                self.sn_sigma[i] = sigma

    def _reset_weight_and_gates(self) -> None:
        """W ~ N(0, weight_std^2) from the module's seed (kept if ``weight_std`` is None); every a <- 1; exact sigma."""
        if self.weight_std is not None:
            self.redraw_weight(self.weight_std)
        for gate in (self.gate, getattr(self, 'unembed_gate', None)):
            if gate is not None:
                write_(gate, torch.ones(gate.shape))
        self.reset_spectral_norm()

    def _maybe_iterate(self) -> None:
        if self.training and self.power_iteration_pending:
            self.power_iteration()
            self.power_iteration_pending = False


class SigmaReparamLinear(Reparameterized, _SpectralNorm, nn.Linear):
    """``y = x W_bar^T + b`` with W_bar = a_s / sigma_s * W_s for every output slice s (q, k, v of a fused Wqkv)."""

    reparam_method = METHOD
    FOLDED_KEYS = ('gate', *SPECTRAL_BUFFERS)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        slice_sizes: Sequence[int] | None = None,
        weight_std: float | None = None,
        init_seed: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.init_seed = init_seed
        self.slice_sizes = tuple(slice_sizes or (out_features,))
        if sum(self.slice_sizes) != out_features:
            raise ValueError(f'slice_sizes {self.slice_sizes} do not add up to {out_features} rows.')
        self.weight_std = weight_std
        self.gate = nn.Parameter(torch.ones(len(self.slice_sizes), device=device, dtype=dtype))
        self._init_spectral_buffers(out_features, in_features, device)
        self._finish_init()

    def reset_reparameterization(self) -> None:
        self._reset_weight_and_gates()
        if self.bias is not None:
            write_(self.bias, torch.zeros(self.bias.shape))

    def slice_scales(self) -> torch.Tensor:
        """a_s / sigma_s for every output slice; sigma is a constant (not differentiated)."""
        return self.gate / self.sn_sigma.clone().to(self.gate.dtype)

    def row_scales(self) -> torch.Tensor:
        """a_s / sigma_s for every output row, shape (out_features, 1)."""
        return expand_rows(self.slice_scales(), self.slice_sizes)

    def virtual_weight(self) -> torch.Tensor:
        return self.weight * self.row_scales()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._maybe_iterate()
        return cast(
            torch.Tensor, ScaledLinearFunction.apply(x, self.weight, self.slice_scales(), self.bias, self.slice_sizes)
        )

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors['weight']
        scale = (tensors['gate'].float() / tensors['sn_sigma'].float()).to(weight.dtype)
        return {'weight': weight * expand_rows(scale, self.slice_sizes)}

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, slices={self.slice_sizes}'


class SigmaReparamEmbedding(Reparameterized, _SpectralNorm, SharedEmbedding):
    """Token embedding ``a_e / sigma * W[x] * output_scale`` (embedding scaling in ``output_scale``).

    With tied embeddings (MPT's ``SharedEmbedding``) the head reuses W with its own scalar:
    ``logits = h (a_p / sigma * W)^T``.
    """

    reparam_method = METHOD
    FOLDED_KEYS = ('gate', 'unembed_gate', *SPECTRAL_BUFFERS)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        tied_head: bool = False,
        output_scale: float = 1.0,
        weight_std: float | None = None,
        init_seed: int | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.init_seed = init_seed
        self.slice_sizes = (num_embeddings,)
        self.output_scale = float(output_scale)
        self.weight_std = weight_std
        self.gate = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.unembed_gate = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if tied_head else None
        self._init_spectral_buffers(num_embeddings, embedding_dim, device)
        self._finish_init()

    def reset_reparameterization(self) -> None:
        self._reset_weight_and_gates()

    def _sigma(self) -> torch.Tensor:
        return self.sn_sigma.clone().to(self.gate.dtype)

    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        self._maybe_iterate()
        if unembed:
            if self.unembed_gate is None:
                raise RuntimeError('This embedding is not tied to a prediction head (no unembed_gate).')
            return cast(
                torch.Tensor,
                ScaledLinearFunction.apply(
                    input, self.weight, self.unembed_gate / self._sigma(), None, self.slice_sizes
                ),
            )
        out = F.embedding(input, self.weight, self.padding_idx)
        return out * (self.gate / self._sigma() * self.output_scale)

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors['weight']
        scale = tensors['gate'].float() / tensors['sn_sigma'].float() * self.output_scale
        return {'weight': weight * scale.to(weight.dtype)}

    def unembed_factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """(a_p / sigma) / (a_e / sigma * output_scale)."""
        return (tensors['unembed_gate'] / (tensors['gate'] * self.output_scale)).item()

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, output_scale={self.output_scale:.4g}, tied={self.unembed_gate is not None}'


def request_power_iteration(model: nn.Module) -> int:
    """Mark every sigma-Reparam module of ``model`` to iterate once at its next training forward.

    Call once per training step before the forward (the ``SigmaReparam`` algorithm does it at
    ``Event.BATCH_START``). Returns the number of modules marked.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _SpectralNorm):
            module.power_iteration_pending = True
            count += 1
    return count
