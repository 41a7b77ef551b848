"""SpikeGuard under ``composer -n 2`` on CPU over gloo: DDP, and Composer's FSDP2 (``FSDP_VERSION=2``).

One rank's loss of one batch is blown up 100-fold: every rank must skip that batch's update (the
decision is taken on the all-reduced loss), leave its parameters and optimizer state (its shards
under FSDP2) bitwise as they were, and train on to the end. Composer's own ``OptimizerMonitor``
fails under FSDP2 (composer issue 3920); the update-ratio monitor runs beside the guard here.
"""

import json
from pathlib import Path

import pytest

from tests.common import streaming_names, tiny_train_config, write_train_yaml
from tests.common.launch import composer_launch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name('spike_guard_worker.py')
BAD = 5  # 0-based batch whose loss rank 0 blows up
BATCHES = 8


@pytest.mark.parametrize('mode', ['ddp', 'fsdp2'])
def test_every_rank_skips_the_blown_up_batch_bitwise_and_trains_on(mode, tiny_mds, tmp_path):
    overrides = {'fsdp_config': {'mixed_precision': 'FULL'}} if mode == 'fsdp2' else {}
    cfg = tiny_train_config(
        tiny_mds,
        algorithms={'wesar': {}},
        callbacks={
            'spike_guard': {'action': 'skip', 'min_history': 3},
            'update_ratio_monitor': {'log_interval': 1},
            'blow_up': {'batch': BAD},
            'guard_check': {'batch': BAD},
        },
        max_duration=f'{BATCHES}ba',
        eval_interval=f'{BATCHES}ba',
        device_train_microbatch_size=2,  # 4 samples a rank: two microbatches accumulated
        **overrides,
    )
    out = tmp_path / mode
    out.mkdir()
    env = {'COMPOSER_DEVICE': 'cpu', streaming_names.ENV: str(streaming_names.LAUNCHES_FROM + 50_000)}
    if mode == 'fsdp2':
        env['FSDP_VERSION'] = '2'
    composer_launch(WORKER, write_train_yaml(cfg, tmp_path / f'{mode}.yaml'), out, env=env, cwd=out)
    ranks = [json.loads((out / f'guard-rank{r}.json').read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank['world_size'] == 2 and rank['batches'] == BATCHES
        assert rank['skipped'] == 1 and rank['skipped_batches'] == [BAD + 1]
        assert rank['params_same'] and rank['optimizer_same'] and rank['optimizer_has_state']
        assert rank['neighbours_moved'] == [True, True]
        assert rank['sharded'] == (mode == 'fsdp2')
