"""Initial draws that do not depend on the rank, written safely into sharded parameters.

Composer seeds rank r with ``seed + r`` before ``Event.INIT``, and FSDP materializes a
meta-device model module by module, in an order that depends on the wrapping. A draw from the
global RNG would therefore give each rank (and each wrapping) different weights. Every matrix
this package initializes instead gets its own seed, derived from the run's rank-zero seed and
the matrix's qualified name (:func:`matrix_seed`), and its values are drawn whole on the
parameter's device in float32 (:func:`normal_like`), then written with :func:`write_`:
into the local shard of an FSDP2 ``DTensor``, or into the tensor itself. A one-process run, a
DDP run, an FSDP1 and an FSDP2 run of the same seed start from the same weights on the same
kind of device.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

__all__ = [
    'matrix_seed',
    'draw_base_seed',
    'normal_like',
    'write_',
    'full_tensor',
    'local_tensor',
    'is_dtensor',
    'MatrixInit',
    'init_matrix',
]

_SEED_MODULUS = 2**63 - 1


def matrix_seed(base_seed: int, name: str) -> int:
    """The seed of one matrix: the run's seed and the matrix's qualified name, mixed."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % _SEED_MODULUS


def draw_base_seed() -> int:
    """A base seed from the global RNG, for callers that give none (``torch.manual_seed`` makes it reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, 'device_mesh') and hasattr(tensor, 'to_local')


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 ``DTensor``, else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 ``DTensor`` (gathered), else the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def normal_like(
    tensor: torch.Tensor,
    stds: Sequence[float],
    seed: int,
    slice_sizes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """N(0, std^2) values of the whole (global) shape of ``tensor``, one std per row slice.

    Drawn in float32 on the device of ``tensor``'s local data with a generator seeded ``seed``:
    the same values on every rank, whatever the sharding. Returned in ``tensor``'s dtype.
    """
    device = local_tensor(tensor).device
    values = torch.empty(tensor.shape, device=device, dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    sizes = list(slice_sizes) if slice_sizes else [tensor.shape[0]]
    if len(sizes) != len(stds):
        raise ValueError(f'{len(stds)} stds for {len(sizes)} row slices {tuple(sizes)}.')
    for rows, std in zip(values.split(sizes), stds):
        rows.normal_(0.0, float(std), generator=generator)
    return values.to(tensor.dtype)


@torch.no_grad()
def write_(param: torch.Tensor, values: torch.Tensor) -> None:
    """``param.copy_(values)`` with ``values`` of the whole shape; for a sharded ``DTensor``, its local part.

    ``DTensor.copy_`` refuses a plain tensor of more than one element, so the values are first
    laid out like ``param`` (each rank keeps its part of the same whole; no communication).
    """
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        values = values.to(device=local.device, dtype=local.dtype)
        values = distribute_tensor(values, param.device_mesh, param.placements, src_data_rank=None)
    else:
        values = values.to(device=param.device, dtype=param.dtype)
    param.copy_(values)


@dataclasses.dataclass(frozen=True)
class MatrixInit:
    """How a plain matrix is drawn: N(0, std^2) per row slice, from its own seed.

    Kept on the module (``MatrixInit.ATTR``) by the algorithms that initialize without
    replacing the module (paper_init, residual_scaling), so that Composer's materialization of
    a meta model draws the same values later.
    """

    ATTR = 'matrix_init'

    slice_sizes: tuple[int, ...]
    stds: tuple[float, ...]
    seed: int

    def scaled(self, factor: float) -> MatrixInit:
        return dataclasses.replace(self, stds=tuple(std * factor for std in self.stds))

    def mark(self, module: nn.Module) -> None:
        setattr(module, self.ATTR, self)

    @classmethod
    def of(cls, module: nn.Module) -> Optional[MatrixInit]:
        return getattr(module, cls.ATTR, None)


@torch.no_grad()
def init_matrix(module: nn.Module) -> bool:
    """Draw ``module``'s weight from its :class:`MatrixInit` (bias and padding row zero); False if it has none."""
    spec = MatrixInit.of(module)
    if spec is None:
        return False
    values = normal_like(module.weight, spec.stds, spec.seed, spec.slice_sizes)
    if getattr(module, 'padding_idx', None) is not None:
        values[module.padding_idx].zero_()
    write_(module.weight, values)
    if getattr(module, 'bias', None) is not None:
        write_(module.bias, torch.zeros(module.bias.shape))
    return True
