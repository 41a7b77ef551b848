"""Worker for test_spike_guard_distributed.py: llm-foundry's ``train_from_yaml`` with SpikeGuard on two ranks.

``composer -n 2 THIS_FILE YAML OUT_DIR`` (DDP over gloo; with ``FSDP_VERSION=2`` and an
``fsdp_config`` in the YAML, Composer's FSDP2). ``blow_up`` multiplies the loss of one batch by
100 on rank 0 only, so the ranks' own losses disagree and only the all-reduced loss is an
outlier. ``guard_check`` keeps this rank's parameters and optimizer state (local shards under
FSDP2) before and after every batch and writes, per rank, whether the blown-up batch left them
bitwise unchanged (the learning rate aside: the schedule moves on) and whether its neighbours changed them.
"""

import json
import os
import sys
import traceback

import torch
from composer.core import Callback
from composer.utils import dist

BLOW_UP = 100.0


def _local(value):
    if isinstance(value, torch.Tensor):
        return (value.to_local() if hasattr(value, 'to_local') else value).detach().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class BlowUp(Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def after_loss(self, state, logger):
        if state.timestamp.batch.value == self.batch and dist.get_global_rank() == 0:
            state.loss = state.loss * BLOW_UP


class GuardCheck(Callback):
    def __init__(self, out_dir: str, batch: int):
        self.out_dir, self.batch = out_dir, batch
        self.before, self.after = {}, {}

    def _take(self, state):
        optimizer = state.optimizers[0].state_dict()
        groups = [{k: v for k, v in g.items() if k != 'lr'} for g in optimizer['param_groups']]  # lr: the schedule's
        return _local(dict(state.model.named_parameters())), _local({'state': optimizer['state'], 'groups': groups})

    def batch_start(self, state, logger):
        self.before[state.timestamp.batch.value] = self._take(state)

    def batch_end(self, state, logger):
        self.after[state.timestamp.batch.value - 1] = self._take(state)

    def fit_end(self, state, logger):
        from wesar_composer import SpikeGuard

        guard = next(c for c in state.callbacks if isinstance(c, SpikeGuard))
        bad = self.batch
        result = {
            'world_size': dist.get_world_size(),
            'batches': state.timestamp.batch.value,
            'skipped': guard.skipped,
            'skipped_batches': [r['batch'] for r in guard.skipped_batches],
            'params_same': _same(self.before[bad][0], self.after[bad][0]),
            'optimizer_same': _same(self.before[bad][1], self.after[bad][1]),
            'optimizer_has_state': bool(self.before[bad][1]['state']),
            'neighbours_moved': [
                not _same(self.before[b][0], self.after[b][0]) and not _same(self.before[b][1], self.after[b][1])
                for b in (bad - 1, bad + 1)
            ],
            'sharded': any(hasattr(p, 'to_local') for p in state.model.parameters()),
            'loss_window': list(guard.loss_detector.values),
            'grad_norm_window': list(guard.grad_detector.values),
        }
        with open(os.path.join(self.out_dir, f'guard-rank{dist.get_global_rank()}.json'), 'w') as f:
            json.dump(result, f)


def main(yaml_path: str, out_dir: str) -> None:
    from llmfoundry.command_utils import train_from_yaml
    from llmfoundry.registry import callbacks

    callbacks.register('blow_up', func=BlowUp)
    callbacks.register('guard_check', func=GuardCheck)
    try:
        train_from_yaml(yaml_path, [f'callbacks.guard_check.out_dir={out_dir}'])
    except Exception as err:  # noqa: BLE001  (the test reads the message)
        with open(os.path.join(out_dir, f'error-rank{dist.get_global_rank()}.txt'), 'w') as f:
            f.write(f'{type(err).__name__}: {err}\n{traceback.format_exc()}')
        raise


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.common.streaming_names import count_names_from_env

    count_names_from_env()
    main(sys.argv[1], sys.argv[2])
