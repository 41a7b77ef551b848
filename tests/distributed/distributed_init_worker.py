"""Worker for test_distributed_init.py, launched with ``composer -n 2 THIS_FILE OUT_DIR``.

Each rank seeds its global RNG with ``100 + rank`` (as Composer seeds rank r with seed + r),
builds a tiny MPT (GQA, so the fused Wqkv has slices of two widths) on the meta device,
applies one algorithm with ``seed=17``, shards it with torch's FSDP2 ``fully_shard`` over gloo,
and materializes it with Composer's own ``meta_init`` (``composer.distributed.param_init``),
whose hard-coded ``to_empty(device='cuda')`` is pointed at the CPU here. Each rank then writes
the whole tensors gathered from the shards, to be compared with a one-process model built
eagerly on the CPU with the same algorithm seed.
"""

import os
import sys

import torch
import torch.distributed as torch_dist
from composer.distributed.param_init import meta_init
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)
from tests.common import APPLY_WITH_SEED, INIT_SEED, mpt_for_init  # noqa: E402


def materialize_on_cpu(model: nn.Module) -> None:
    """Composer's FSDP2 meta_init, with its CUDA device replaced by the CPU."""
    to_empty = nn.Module.to_empty

    def to_empty_on_cpu(self, *, device, recurse=True):
        return to_empty(self, device='cpu', recurse=recurse)

    nn.Module.to_empty = to_empty_on_cpu
    try:
        meta_init(model)
    finally:
        nn.Module.to_empty = to_empty


def main(out_dir: str) -> None:
    torch_dist.init_process_group('gloo')
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    mesh = init_device_mesh('cpu', (world,))
    from llmfoundry.models.mpt.modeling_mpt import MPTBlock

    results = {}
    for method, apply in APPLY_WITH_SEED.items():
        torch.manual_seed(100 + rank)
        model = mpt_for_init(init_device='meta')
        apply(model, seed=INIT_SEED)
        for module in model.modules():
            if isinstance(module, MPTBlock):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        materialize_on_cpu(model)
        state = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if hasattr(tensor, 'to_local') else tensor
            state[name] = {
                'full': tensor.full_tensor() if hasattr(tensor, 'full_tensor') else tensor.detach().clone(),
                'local_numel': local.numel(),
            }
        results[method] = state
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    torch_dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
