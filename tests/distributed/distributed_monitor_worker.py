"""Worker for test_monitor_distributed.py, launched with ``composer -n 2 THIS_FILE OUT_DIR``.

DDP: a Composer Trainer under DDP (gloo, CPU) with the monitor; each rank writes what
it logged and the update ratios computed by hand from weights copied before and after each step.

FSDP: torch FSDP1 (``use_orig_params``) and FSDP2 (``fully_shard``) on CPU, each rank
holding a shard; the monitor on the sharded model must give the values of the same monitor on
the whole tensors gathered from the shards, and (gradients aside) those of the same monitor on
an unsharded replica that takes the same steps. (FSDP2 over gloo sums the gradients of the
ranks instead of averaging them, so the replica's gradient norms are half the sharded ones;
the ground truth gathered from the shards is the reference for those.)
"""

import json
import os
import sys

import torch
import torch.distributed as torch_dist
from composer.algorithms import GradientClipping
from composer.loggers import InMemoryLogger
from composer.utils import dist
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)
from tests.common import TokenBatches, cpu_trainer, mpt  # noqa: E402
from tests.common.callbacks import UpdateRatioRecorder  # noqa: E402
from wesar_composer import UpdateRatioMonitor, WeSaR, apply_wesar  # noqa: E402
from wesar_composer.roles import find_matrices  # noqa: E402

STEPS = 3


def run_ddp(out_dir):
    model = mpt(d_model=64, n_layers=2, kv_n_heads=2)
    dataset = TokenBatches(n=32)
    recorder = UpdateRatioRecorder(model)
    logger = InMemoryLogger()
    trainer = cpu_trainer(
        model,
        dataloader=DataLoader(dataset, batch_size=2, sampler=dist.get_sampler(dataset, shuffle=False)),
        max_duration=f'{STEPS}ba',
        algorithms=[WeSaR(), GradientClipping(clipping_type='norm', clipping_threshold=1.0)],
        callbacks=[UpdateRatioMonitor(log_interval=1, families='all', layers='all'), recorder],
        loggers=[logger],
    )
    trainer.fit()
    logged = {
        k: [v for _, v in values]
        for k, values in logger.data.items()
        if '/' in k and k.split('/')[0] in ('update_ratio', 'param_norm', 'grad_norm', 'gate')
    }
    first_rows = model.model.transformer.wte.weight.detach()[:2].tolist()
    _write(
        out_dir,
        'ddp',
        {'logged': logged, 'by_hand': recorder.by_key(), 'world_size': dist.get_world_size(), 'wte_rows': first_rows},
    )
    trainer.close()


def run_sharded(out_dir):
    from llmfoundry.models.layers.blocks import MPTBlock
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if not torch_dist.is_initialized():  # the DDP part's Trainer has set up gloo already
        torch_dist.init_process_group('gloo')
    world = torch_dist.get_world_size()
    batch = {
        k: torch.stack([TokenBatches(n=32)[i][k] for i in range(4)]) for k in ('input_ids', 'labels', 'attention_mask')
    }
    results = {'world_size': world}
    for mode in ('fsdp1', 'fsdp2'):
        model = apply_wesar(mpt(d_model=64, n_layers=2, kv_n_heads=2, seed=3))
        replica = apply_wesar(mpt(d_model=64, n_layers=2, kv_n_heads=2, seed=3))
        replica.load_state_dict(model.state_dict())
        reference = UpdateRatioMonitor(log_interval=1, families='all', layers='all')
        reference.attach(replica)
        monitor = UpdateRatioMonitor(log_interval=1, families='all', layers='all')
        monitor.discover(model)  # before sharding, as at Event.INIT
        specs = find_matrices(model)
        if mode == 'fsdp1':
            sharded = FSDP(
                model,
                auto_wrap_policy=ModuleWrapPolicy({MPTBlock}),
                use_orig_params=True,
                device_id=torch.device('cpu'),
            )
        else:
            mesh = init_device_mesh('cpu', (world,))
            for block in model.model.transformer.blocks:
                fully_shard(block, mesh=mesh)
            sharded = fully_shard(model, mesh=mesh)
        monitor.attach(sharded)
        local_numel = sum(
            m.module.weight.to_local().numel() if hasattr(m.module.weight, 'to_local') else m.module.weight.numel()
            for m in monitor._matrices
        )
        optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        reference_optimizer = torch.optim.AdamW(replica.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        steps = []
        for _ in range(STEPS):
            for net, owner, opt, mon in (
                (sharded, model, optimizer, monitor),
                (replica, replica, reference_optimizer, reference),
            ):
                opt.zero_grad()
                owner.loss(net(batch), batch).backward()
                if net is sharded:
                    before = _gathered(specs, sharded, mode)
                mon.begin_step()
                opt.step()
            after = _gathered(specs, sharded, mode)
            truth = {}
            for key, (w, g, gate) in before.items():
                truth[f'update_ratio/{key}'] = ((after[key][0] - w).norm() / w.norm()).item()
                truth[f'param_norm/{key}'] = w.norm().item()
                truth[f'grad_norm/{key}'] = g.norm().item()
                truth[f'gate/{key}'] = gate
            steps.append({'sharded': monitor.end_step(), 'replica': reference.end_step(), 'truth': truth})
        full_numel = sum(m.shape[0] * m.shape[1] for m in monitor._matrices)
        results[mode] = {'steps': steps, 'local_numel': local_numel, 'full_numel': full_numel}
    _write(out_dir, 'fsdp', results)
    torch_dist.destroy_process_group()


def _gathered(specs, sharded, mode):
    """Every matrix slice gathered whole, with its gradient and gate: {key: (W, grad W, gate)}."""
    from contextlib import nullcontext

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def whole(t):
        return (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach().clone()

    out = {}
    context = FSDP.summon_full_params(sharded, with_grads=True) if mode == 'fsdp1' else nullcontext()
    with context:
        for spec in specs:
            weight, grad = whole(spec.module.weight), whole(spec.module.weight.grad)
            gates = whole(spec.module.gate).tolist()
            sizes = list(spec.slice_sizes)
            for role, w, g, gate in zip(spec.roles, weight.split(sizes), grad.split(sizes), gates):
                out[role if spec.layer is None else f'L{spec.layer}/{role}'] = (w, g, gate)
    return out


def _write(out_dir, mode, payload):
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    with open(os.path.join(out_dir, f'{mode}-rank{rank}.json'), 'w') as f:
        json.dump(payload, f)


if __name__ == '__main__':
    out = sys.argv[1]
    run_ddp(out)
    run_sharded(out)
