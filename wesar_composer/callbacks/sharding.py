"""Where this rank's part of a parameter lies: FSDP1 flat shards and FSDP2 ``DTensor`` shards.

The update-ratio monitor and the spike guard sum squares over the part of each tensor a rank
holds and all-reduce the sums over the shard group, as Composer's ``OptimizerMonitor`` does.
These helpers find that part: the local data, its flat offset in the whole tensor, and the
group to reduce over. The ``DTensor`` test and the local data are
:func:`wesar_composer.reparam.init.is_dtensor` and :func:`~wesar_composer.reparam.init.local_tensor`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from wesar_composer.reparam.init import is_dtensor, local_tensor

__all__ = [
    'dtensor_local',
    'dtensor_shard_group',
    'fsdp1_shards',
    'global_numel',
    'grad_sq_share',
    'is_dtensor',
    'is_sharded',
    'local_part',
    'local_tensor',
    'lookup',
    'modules_by_name',
]

# Module-name segments that wrappers insert (FSDP, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = frozenset({'_fsdp_wrapped_module', '_checkpoint_wrapped_module', '_orig_mod'})

ShardInfo = dict[int, tuple[int, int]]  # FSDP1: id(original param) -> (flat start in the global param, global numel)


def local_part(param: torch.Tensor, numel: int, shard_info: ShardInfo) -> tuple[torch.Tensor, int]:
    """This rank's part of ``param`` (``numel`` elements whole) as a flat tensor, and its flat start in the whole."""
    if is_dtensor(param):
        return dtensor_local(param)
    if param.numel() != numel and id(param) in shard_info:  # FSDP1 sharded flat view
        return param.detach().reshape(-1), shard_info[id(param)][0]
    return param.detach().reshape(-1), 0


def grad_sq_share(params: Any, shard_info: ShardInfo, world_size: int) -> torch.Tensor:
    """This rank's share of the squared global gradient norm of ``params``: shards add up over the
    ranks, a replicated gradient (DDP) counts once. Stays on the device: no host sync."""
    sharded, replicated = [], []
    for param in params:
        if param.grad is not None:
            grad = local_tensor(param.grad).detach().reshape(-1)
            (sharded if is_sharded(param, shard_info) else replicated).append(grad)
    total = None
    for tensors, weight in ((sharded, 1.0), (replicated, 1.0 / world_size)):
        if tensors:
            norms = torch._foreach_norm(tensors, 2)  # pyright: ignore[reportPrivateImportUsage]
            part = torch.stack(norms).double().square().sum() * weight
            total = part if total is None else total + part.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def is_sharded(tensor: torch.Tensor, shard_info: ShardInfo) -> bool:
    """Whether ranks hold different parts of ``tensor`` (an FSDP1 sharded view or a sharded ``DTensor``)."""
    if id(tensor) in shard_info:
        return True
    return is_dtensor(tensor) and any(p.is_shard() for p in tensor.placements)  # pyright: ignore[reportAttributeAccessIssue]


def dtensor_local(param: Any) -> tuple[torch.Tensor, int]:
    """FSDP2: the local rows of a ``DTensor`` sharded on dim 0, flat, and their flat global offset."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in param.placements:
        if placement.is_shard() and placement.dim != 0:
            raise ValueError(f'Only parameters sharded on dim 0 are supported, got placements {param.placements}.')
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row_numel = math.prod(param.shape[1:])
    return param.to_local().detach().reshape(-1), (offset[0] if offset else 0) * row_numel


def dtensor_shard_group(param: Any) -> Any:
    """The process group over which a ``DTensor``'s shards are spread."""
    mesh = param.device_mesh
    shard_dims = [i for i, p in enumerate(param.placements) if p.is_shard()]
    return mesh.get_group(shard_dims[0]) if mesh.ndim > 1 else mesh.get_group()


def fsdp1_shards(model: nn.Module) -> tuple[ShardInfo, list]:
    """FSDP1 with ``use_orig_params``: where each original parameter's shard starts, and the shard groups."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return {}, []
    table: ShardInfo = {}
    groups = []
    for module in model.modules():
        handle = getattr(module, '_handle', None) if isinstance(module, FSDP) else None
        if handle is None or not handle.uses_sharded_strategy:
            continue
        flat_param = handle.flat_param
        if flat_param._params is None:
            raise ValueError(
                "FSDP with use_orig_params=False hides the original parameters; use use_orig_params=True (Composer's "
                'default) with this callback.',
            )
        groups.append(module.process_group)
        for param, info, shape in zip(flat_param._params, flat_param._shard_param_infos, flat_param._shapes):
            start = info.intra_param_start_idx if info.in_shard else 0
            table[id(param)] = (start or 0, math.prod(shape))
    return table, groups


def global_numel(tensor: torch.Tensor, shard_info: ShardInfo) -> int:
    """Elements of the whole tensor: a ``DTensor`` knows its global shape, FSDP1 views are looked up."""
    if id(tensor) in shard_info:
        return shard_info[id(tensor)][1]
    return math.prod(tensor.shape)


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Modules keyed by their name with wrapper segments (FSDP, checkpointing, compile) removed."""
    named = {}
    for name, module in model.named_modules():
        clean = '.'.join(part for part in name.split('.') if part not in _WRAPPER_SEGMENTS)
        named.setdefault(clean, module)
    return named


def lookup(modules: dict[str, nn.Module], name: str, owner: str) -> nn.Module:
    """The module called ``name`` relative to the unwrapped model, under any wrapper prefix."""
    if name in modules:
        return modules[name]
    matches = [key for key in modules if key.endswith('.' + name)]
    if len(matches) != 1:
        raise ValueError(
            f'{owner}: module {name!r}, found when the model was built, is '
            f'{"missing" if not matches else "ambiguous"} in the trained model (matches: {matches}).',
        )
    return modules[matches[0]]
