"""Initial weights do not depend on the rank, the device placement or FSDP2's meta materialization.

Composer seeds rank r with seed + r; FSDP2 shards a meta-built model first and materializes it
module by module through ``param_init_fn`` (where a write into a sharded gate must be a
DTensor). Every algorithm must give each rank, after that sequence, the weights a one-process
eager build of the same seed gives.
"""

from pathlib import Path

import pytest
import torch

from tests.common import APPLY_WITH_SEED, INIT_SEED, mpt_for_init
from tests.common.launch import composer_launch

WORKER = Path(__file__).with_name('distributed_init_worker.py')


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('init')
    composer_launch(WORKER, out, timeout=400)
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in (0, 1)]


def eager(method):
    torch.manual_seed(5)  # another global seed: the algorithm's seed alone decides
    model = mpt_for_init()
    APPLY_WITH_SEED[method](model, seed=INIT_SEED)
    return dict([*model.named_parameters(), *model.named_buffers()])


@pytest.mark.slow
@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_fsdp2_meta_materialization_gives_every_rank_the_one_process_weights(ranks, method):
    reference = eager(method)
    rank0, rank1 = ranks[0][method], ranks[1][method]
    assert set(rank0) == set(rank1) == set(reference)
    sharded = [n for n in rank0 if rank0[n]['local_numel'] < rank0[n]['full'].numel()]
    assert any(n.endswith('Wqkv.weight') for n in sharded)  # really sharded
    for name, tensor in reference.items():
        assert torch.equal(rank0[name]['full'], rank1[name]['full']), (method, name)
        if name.endswith(('sn_u', 'sn_v')):  # sigma-Reparam's singular vectors: an SVD, threads change its last digits
            torch.testing.assert_close(rank0[name]['full'], tensor, rtol=0, atol=1e-3)
        elif name.endswith('sn_sigma'):
            torch.testing.assert_close(rank0[name]['full'], tensor, rtol=1e-5, atol=0)
        else:
            assert torch.equal(rank0[name]['full'], tensor.detach()), (method, name)


@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_eager_init_depends_on_the_seed_only(method):
    a, b = eager(method), eager(method)
    torch.manual_seed(6)
    model = mpt_for_init()
    APPLY_WITH_SEED[method](model, seed=INIT_SEED + 1)
    other = dict(model.named_parameters())
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    changed = [n for n, t in other.items() if t.dim() == 2 and not torch.equal(t, a[n])]
    assert any(n.endswith('Wqkv.weight') for n in changed)
