"""Gated drop-in replacements for ``nn.Linear`` and llm-foundry's ``SharedEmbedding``.

A gated matrix computes with the virtual parameter W_bar = a * W (Section 4.1), where the
actual parameter W ~ N(0, sigma^2) and the trainable gate a starts at s_r / sigma.

Implementation: the package's scaled linear function puts the gate into work the layer does
anyway. Under autocast (and with bf16 parameters) it goes into the cast of W to the compute
dtype, (a * W) rounded once, and into the cast of the weight gradient back to W's dtype; the
gate's gradient is one dot product per slice. In full precision it scales the smallest of
input, weight and output. The embedding scales its output (B x T x d is far smaller than
vocab x d).

The gate's gradient divides by the gate when every gate of the matrix is known to be nonzero
(``gates_nonzero``, a host-side flag: no device sync in the forward). The flag is set from the
initial values, cleared by a state-dict load, and refreshed after each optimizer step by
:func:`refresh_nonzero_gates` (one small device-to-host read per step for the whole model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from llmfoundry.models.layers.custom_embedding import SharedEmbedding
from torch import nn

from wesar_composer.reparam.init import local_tensor, write_
from wesar_composer.reparam.modules import Reparameterized, ScaledLinearFunction, expand_rows

__all__ = ['GatedLinear', 'GatedEmbedding', 'refresh_nonzero_gates']

METHOD = 'wesar'


def reset_gated(module: nn.Module, weight_std: float | None, gate_init: Sequence[float]) -> None:
    """W ~ N(0, weight_std^2) from the module's own seed (kept as is if ``weight_std`` is None); gate <- gate_init."""
    if weight_std is not None:
        module.redraw_weight(weight_std)
    write_(module.gate, torch.tensor(gate_init))


class _ScaledGates:
    """The host-side ``gates_nonzero`` flag of the gates that go through the scaled linear function."""

    gates_nonzero: bool = False

    def scaled_gates(self) -> list[torch.Tensor]:
        """The gates passed to the scaled linear function as its scales."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        self.gates_nonzero = False  # unknown until the next refresh


@torch.no_grad()
def refresh_nonzero_gates(modules) -> None:
    """Set ``gates_nonzero`` of every gated module from its gates' values: one device-to-host read.

    ``modules``: the model or an iterable of its gated modules. Under FSDP each rank holds a
    shard of a gate; the verdict is all-reduced so that every rank takes the same path.
    """
    from composer.utils import dist

    if isinstance(modules, nn.Module):
        modules = modules.modules()
    modules = [m for m in modules if isinstance(m, _ScaledGates) and m.scaled_gates()]
    gates = [(m, local_tensor(g)) for m in modules for g in m.scaled_gates()]
    if not gates or any(g.is_meta for _, g in gates):
        return
    device = gates[0][1].device
    zero = torch.stack([(g == 0).any().to(device) for _, g in gates]).to(torch.int32)
    if dist.get_world_size() > 1:
        dist.all_reduce(zero, reduce_operation='MAX')
    nonzero = {id(m): True for m in modules}
    for (module, _), has_zero in zip(gates, zero.tolist()):
        nonzero[id(module)] = nonzero[id(module)] and not has_zero
    for module in modules:
        module.gates_nonzero = nonzero[id(module)]


class GatedLinear(Reparameterized, _ScaledGates, nn.Linear):
    """``y = x (a * W)^T + b`` with one scalar gate per output slice.

    ``slice_sizes`` splits the output rows (q, k, v of a fused projection); a plain
    projection has one slice. ``weight_std``, ``gate_init`` and ``init_seed`` are kept so that
    ``reset_parameters`` (called by Composer when it materializes a meta-device model) gives
    exactly the WeSaR initialization, the same on every rank. ``weight_std=None`` keeps W as it
    is (the function-preserving mode of pretrained weights).
    """

    reparam_method = METHOD
    FOLDED_KEYS = ('gate',)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        gate_init: Sequence[float] = (1.0,),
        slice_sizes: Sequence[int] | None = None,
        weight_std: float | None = None,
        trainable_gate: bool = True,
        init_seed: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.init_seed = init_seed
        self.slice_sizes = tuple(slice_sizes or (out_features,))
        if sum(self.slice_sizes) != out_features or len(self.slice_sizes) != len(gate_init):
            raise ValueError(
                f'slice_sizes {self.slice_sizes} and gates {tuple(gate_init)} do not fit {out_features} rows.'
            )
        self.gate_init = tuple(float(g) for g in gate_init)
        self.weight_std = weight_std
        self.gate = nn.Parameter(
            torch.tensor(self.gate_init, device=device, dtype=dtype or torch.get_default_dtype()),
            requires_grad=trainable_gate,
        )
        self.gates_nonzero = all(g != 0 for g in self.gate_init)
        self._finish_init()

    def reset_reparameterization(self) -> None:
        reset_gated(self, self.weight_std, self.gate_init)
        self.gates_nonzero = all(g != 0 for g in self.gate_init)
        if self.bias is not None:
            write_(self.bias, torch.zeros(self.bias.shape))

    def scaled_gates(self) -> list[torch.Tensor]:
        return [self.gate]

    def row_gates(self) -> torch.Tensor:
        """The gate of every output row, shape (out_features, 1)."""
        return expand_rows(self.gate, self.slice_sizes)

    def virtual_weight(self) -> torch.Tensor:
        """W_bar = a * W."""
        return self.weight * self.row_gates()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(
            torch.Tensor,
            ScaledLinearFunction.apply(x, self.weight, self.gate, self.bias, self.slice_sizes, self.gates_nonzero),
        )

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors['weight']
        return {'weight': weight * expand_rows(tensors['gate'], self.slice_sizes).to(weight)}

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, slices={self.slice_sizes}'


class GatedEmbedding(Reparameterized, _ScaledGates, SharedEmbedding):
    """Token embedding ``a_e * W_e[x] * scale`` with embedding scaling ``scale = 1 / std(W_e)``.

    With tied embeddings (MPT's ``SharedEmbedding``), the prediction head reuses W with its
    own gate: ``logits = h (a_p * W)^T``.
    """

    reparam_method = METHOD
    FOLDED_KEYS = ('gate', 'unembed_gate')

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        gate_init: float = 1.0,
        unembed_gate_init: float | None = None,
        output_scale: float = 1.0,
        weight_std: float | None = None,
        trainable_gate: bool = True,
        init_seed: int | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.init_seed = init_seed
        self.gate_init = (
            (float(gate_init),) if unembed_gate_init is None else (float(gate_init), float(unembed_gate_init))
        )
        self.output_scale = float(output_scale)
        self.weight_std = weight_std
        self.gate = nn.Parameter(torch.tensor(self.gate_init[:1], device=device), requires_grad=trainable_gate)
        self.unembed_gate = None
        if unembed_gate_init is not None:
            self.unembed_gate = nn.Parameter(
                torch.tensor(self.gate_init[1:], device=device), requires_grad=trainable_gate
            )
        self.gates_nonzero = all(g != 0 for g in self.gate_init[1:])
        self._finish_init()

    def reset_reparameterization(self) -> None:
        reset_gated(self, self.weight_std, self.gate_init[:1])
        if self.unembed_gate is not None:
            write_(self.unembed_gate, torch.tensor(self.gate_init[1:]))
        self.gates_nonzero = all(g != 0 for g in self.gate_init[1:])

    def scaled_gates(self) -> list[torch.Tensor]:
        return [] if self.unembed_gate is None else [self.unembed_gate]

    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        if unembed:
            if self.unembed_gate is None:
                raise RuntimeError('This embedding is not tied to a prediction head (no unembed gate).')
            return cast(
                torch.Tensor,
                ScaledLinearFunction.apply(
                    input, self.weight, self.unembed_gate, None, (self.num_embeddings,), self.gates_nonzero
                ),
            )
        out = F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return out * (self.gate * self.output_scale)

    def fold_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors['weight']
        return {'weight': weight * (tensors['gate'] * self.output_scale).to(weight)}

    def unembed_factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """a_p / (a_e * scale): the head's weight over the folded embedding's."""
        return (tensors['unembed_gate'] / (tensors['gate'] * self.output_scale)).item()

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, output_scale={self.output_scale:.4g}, tied={self.unembed_gate is not None}'
