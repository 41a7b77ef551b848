"""Worker for test_fsdp2_train.py: llm-foundry's ``train_from_yaml`` with a recorder callback.

``main(YAML, OUT_DIR)`` in the test process (one process) or ``composer -n 2 THIS_FILE YAML OUT_DIR``
(with ``FSDP_VERSION=2`` and an ``fsdp_config`` in the YAML: Composer's FSDP2 over gloo on CPU).
The recorder writes the loss of every batch on every rank, and rank 0 writes the whole
parameters of the trained model (gathered from the shards) and what the update-ratio
monitor logged at the last batch. An error raised by training is written to ``error.txt``.
"""

import json
import os
import sys
import traceback

import torch
from composer.core import Callback
from composer.utils import dist
from llmfoundry.command_utils import train_from_yaml
from llmfoundry.registry import callbacks


class Recorder(Callback):
    """Losses of every batch, and the monitor's metrics, from a real Composer run."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.losses = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss.item()))

    def fit_end(self, state, logger):
        rank = dist.get_global_rank()
        with open(os.path.join(self.out_dir, f'losses-rank{rank}.json'), 'w') as f:
            json.dump(self.losses, f)
        weights = {}
        for name, param in state.model.named_parameters():
            weights[name] = (param.full_tensor() if hasattr(param, 'full_tensor') else param).detach().cpu().clone()
        if rank == 0:
            torch.save(weights, os.path.join(self.out_dir, 'weights.pt'))
            metrics = {
                k: float(v)
                for d in logger.destinations
                if hasattr(d, 'most_recent_values')
                for k, v in d.most_recent_values.items()
                if isinstance(v, (int, float)) or getattr(v, 'numel', lambda: 0)() == 1
            }
            with open(os.path.join(self.out_dir, 'metrics.json'), 'w') as f:
                json.dump(metrics, f)


def main(yaml_path: str, out_dir: str) -> None:
    callbacks.register('test_recorder', func=Recorder)
    try:
        train_from_yaml(yaml_path, [f'callbacks.test_recorder.out_dir={out_dir}'])
    except Exception as err:  # noqa: BLE001  (the test reads the message)
        with open(os.path.join(out_dir, f'error-rank{dist.get_global_rank()}.txt'), 'w') as f:
            f.write(f'{type(err).__name__}: {err}\n{traceback.format_exc()}')
        raise


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.common.streaming_names import count_names_from_env

    count_names_from_env()
    main(sys.argv[1], sys.argv[2])
