"""Composer's own FSDP2 path on CPU over gloo: ``composer -n 2`` + llm-foundry ``train_from_yaml``.

Every rank builds the model on the CPU with its own seed (Composer seeds rank r with seed + r)
and no ``sync_module_states``: the run starts from the one-process model only if the
algorithm's init does not depend on the rank. The losses and final weights of the two-rank
FSDP2 run are compared with a one-process run of the same YAML.

Gradient clipping is off here: gloo's ``reduce_scatter(op=AVG)`` returns the sum of the ranks'
gradients, so FSDP2 over gloo sees gradients twice those of the one-process run. Adam's step
does not depend on a constant gradient scale (up to its epsilon), so weights and losses still
agree; the monitor's ``grad_norm/`` keys come out twice the one-process values, and its update
ratios agree. (On NCCL the average is an average.)
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.common import streaming_names
from tests.common.launch import composer_launch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name('distributed_train_worker.py')
FSDP = {'mixed_precision': 'FULL', 'state_dict_type': 'sharded'}


def run(yaml_path: Path, out: Path, world: int, expect_ok: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {'FSDP_VERSION': '2', 'COMPOSER_DEVICE': 'cpu', streaming_names.ENV: str(streaming_names.LAUNCHES_FROM)}
    return composer_launch(WORKER, yaml_path, out, world=world, env=env, cwd=out, check=expect_ok)


def run_here(yaml_path: Path, out: Path) -> None:
    """The one-process reference run: the same worker's main, in this process (no interpreter to start)."""
    from tests.distributed import distributed_train_worker

    out.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out)
        patch.setenv('FSDP_VERSION', '2')
        patch.setenv('COMPOSER_DEVICE', 'cpu')
        distributed_train_worker.main(str(yaml_path), str(out))


@pytest.fixture(scope='module')
def wesar_runs(tiny_mds, tmp_path_factory):
    from tests.common import tiny_train_config, write_train_yaml

    root = tmp_path_factory.mktemp('fsdp2')

    def make(name, **overrides):
        cfg = tiny_train_config(
            tiny_mds,
            algorithms={'wesar': {}},
            callbacks={
                'update_ratio_monitor': {'log_interval': 1, 'families': 'all', 'layers': 'all'},
                'test_recorder': {},
            },
            loggers={'inmemory': {}},
            **{
                'max_duration': '3ba',
                'eval_interval': '3ba',
                'train_loader': {'dataset': {'shuffle': False}},
                **overrides,
            },
        )
        del cfg['algorithms']['gradient_clipping']  # see the module docstring
        return write_train_yaml(cfg, root / f'{name}.yaml')

    single = root / 'single'
    run_here(make('single'), single)
    sharded = root / 'sharded'
    run(make('sharded', fsdp_config=FSDP, save_folder=str(root / 'ckpt'), save_interval='3ba'), sharded, world=2)
    return {'root': root, 'make': make, 'single': single, 'sharded': sharded}


def test_fsdp2_run_matches_the_one_process_run(wesar_runs):
    single, sharded = wesar_runs['single'], wesar_runs['sharded']
    one = json.loads((single / 'losses-rank0.json').read_text())
    ranks = [json.loads((sharded / f'losses-rank{r}.json').read_text()) for r in (0, 1)]
    assert len(one) == 3
    for step, loss in enumerate(one):  # each rank has half the batch; equal token counts, so the mean is the loss
        assert (ranks[0][step] + ranks[1][step]) / 2 == pytest.approx(loss, rel=1e-5), step
    a, b = torch.load(single / 'weights.pt'), torch.load(sharded / 'weights.pt')
    assert set(a) == set(b)
    assert any(k.endswith('Wqkv.gate') for k in a)
    worst = max((a[k] - b[k]).abs().max().item() / a[k].abs().max().item() for k in a)
    assert worst < 1e-4


def test_monitor_under_fsdp2_logs_the_one_process_ratios(wesar_runs):
    one = json.loads((wesar_runs['single'] / 'metrics.json').read_text())
    two = json.loads((wesar_runs['sharded'] / 'metrics.json').read_text())
    ratios = [k for k in one if k.startswith('update_ratio/L')]
    assert ratios
    for key in ratios:
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    grads = [k for k in one if k.startswith('grad_norm/L')]
    assert grads
    for key in grads:  # gloo's reduce_scatter(AVG) sums: twice the one-process gradients
        assert two[key] == pytest.approx(2 * one[key], rel=1e-3), key


def test_sharded_wesar_checkpoint_refused_by_a_run_without_wesar(wesar_runs, tiny_mds):
    from tests.common import tiny_train_config, write_train_yaml

    root = wesar_runs['root']
    checkpoint = root / 'ckpt' / 'ep0-ba3'
    assert (checkpoint / '.metadata').exists()
    cfg = tiny_train_config(
        tiny_mds,
        algorithms={'paper_init': {}},
        max_duration='4ba',
        fsdp_config=FSDP,
        load_path=str(checkpoint),
    )
    out = root / 'paper_init'
    proc = run(write_train_yaml(cfg, root / 'paper_init.yaml'), out, world=2, expect_ok=False)
    assert proc.returncode != 0
    error = (out / 'error-rank0.txt').read_text()
    assert 'saved by a run with the wesar algorithm' in error, error[-2000:]


def test_sharded_wesar_checkpoint_resumes_a_wesar_run(wesar_runs):
    root = wesar_runs['root']
    out = root / 'resumed'
    run(
        wesar_runs['make']('resumed', fsdp_config=FSDP, max_duration='4ba', load_path=str(root / 'ckpt' / 'ep0-ba3')),
        out,
        world=2,
    )
    losses = [json.loads((out / f'losses-rank{r}.json').read_text()) for r in (0, 1)]
    assert [len(x) for x in losses] == [1, 1]  # batches 1-3 came from the checkpoint
    assert all(torch.isfinite(torch.tensor(x)).all() for x in losses)
