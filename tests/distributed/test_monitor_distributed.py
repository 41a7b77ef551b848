"""UpdateRatioMonitor across processes on CPU: DDP in a Composer Trainer, FSDP1 and FSDP2 shards."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name('distributed_monitor_worker.py')
COMPOSER = Path(sys.executable).with_name('composer')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('distributed')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [str(COMPOSER), '-n', '2', '--master_port', str(free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: [json.loads((out / f'{name}-rank{r}.json').read_text()) for r in (0, 1)] for name in ('ddp', 'fsdp')}


@pytest.mark.slow
def test_ddp_both_ranks_log_the_ratios_of_weights_copied_by_hand(results):
    rank0, rank1 = results['ddp']
    assert rank0['world_size'] == 2
    assert rank0['logged'] == rank1['logged']
    assert len(rank0['by_hand']) == 2 * 6 + 2
    for key, by_hand in rank0['by_hand'].items():
        assert rank0['logged'][f'update_ratio/{key}'] == pytest.approx(by_hand, rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['fsdp1', 'fsdp2'])
def test_sharded_monitor_matches_the_gathered_tensors(results, mode):
    for rank in results['fsdp']:
        run = rank[mode]
        assert rank['world_size'] == 2
        assert run['local_numel'] < run['full_numel']  # each rank really holds a part
        for step in run['steps']:
            sharded, truth, replica = step['sharded'], step['truth'], step['replica']
            assert set(truth) < set(sharded) == set(replica)
            for key, value in truth.items():
                assert sharded[key] == pytest.approx(value, rel=2e-5), (mode, key)
            for key, value in replica.items():
                if not key.startswith('grad_norm/'):
                    assert sharded[key] == pytest.approx(value, rel=1e-4), (mode, key)
    assert results['fsdp'][0][mode]['steps'] == results['fsdp'][1][mode]['steps']
