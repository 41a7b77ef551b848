"""WeSaR inside a Composer Trainer: optimizer groups, trainable and fixed gates, checkpoint resume."""

import pytest

from tests.common import cpu_trainer, mpt
from wesar_composer import WeSaR, gate_table
from wesar_composer.algorithms.wesar import GatedLinear


def trainer(model, duration='2ba', **kwargs):
    return cpu_trainer(model, max_duration=duration, **kwargs)


def test_gates_get_their_own_param_group_and_train():
    model = mpt(n_layers=2)
    t = trainer(model, algorithms=[WeSaR(gate_weight_decay=0.0)])
    groups = t.state.optimizers[0].param_groups
    assert len(groups) == 2
    gates = [m.gate for m in model.modules() if isinstance(m, GatedLinear)]
    gate_group = groups[1]
    assert {id(p) for p in gate_group['params']} >= {id(g) for g in gates}
    assert gate_group['weight_decay'] == 0.0 and groups[0]['weight_decay'] == 1e-5
    assert gate_group['initial_lr'] == groups[0]['initial_lr'] == 1e-3
    before = [r['gate'] for r in gate_table(model)]
    t.fit()
    after = [r['gate'] for r in gate_table(model)]
    assert all(abs(a - b) > 1e-6 for a, b in zip(after, before))


def test_fixed_gates_stay_at_their_initial_value():
    model = mpt(n_layers=2)
    t = trainer(model, algorithms=[WeSaR(trainable_gates=False)])
    assert len(t.state.optimizers[0].param_groups) == 1
    before = gate_table(model)
    t.fit()
    after = gate_table(model)
    assert [r['gate'] for r in after] == [r['gate'] for r in before]
    assert all(abs(a['weight_std'] - b['weight_std']) > 0 for a, b in zip(after, before))  # W trained


def test_resume_from_mid_run_checkpoint_gives_the_same_losses(tmp_path):
    from composer.loggers import InMemoryLogger

    def run(**kwargs):
        logger = InMemoryLogger()
        t = trainer(mpt(n_layers=2), duration='4ba', algorithms=[WeSaR()], loggers=[logger], **kwargs)
        t.fit()
        losses = [float(v) for _, v in logger.data['loss/train/total']]
        return t, losses

    _, uninterrupted = run()
    _, first_half = run(save_folder=str(tmp_path), save_interval='2ba', save_filename='ep{epoch}-ba{batch}.pt')
    checkpoint = tmp_path / 'ep0-ba2.pt'
    assert checkpoint.exists()
    resumed_trainer, resumed = run(load_path=str(checkpoint))
    assert len(uninterrupted) == 4 and len(resumed) == 2
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-6, abs=1e-7)
    assert first_half[:2] == pytest.approx(uninterrupted[:2], rel=1e-6, abs=1e-7)
    assert 'model.transformer.blocks.0.attn.Wqkv.gate' in resumed_trainer.state.model.state_dict()
