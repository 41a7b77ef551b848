"""UpdateRatioMonitor across processes on CPU: DDP in a Composer Trainer, FSDP1 and FSDP2 shards."""

import json
from pathlib import Path

import pytest

from tests.common.launch import composer_launch

WORKER = Path(__file__).with_name('distributed_monitor_worker.py')


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('distributed')
    composer_launch(WORKER, out, timeout=400)
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
