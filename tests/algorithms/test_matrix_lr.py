"""paper_init's per-matrix learning rates: the steps of fixed-gate WeSaR under Adam, without gates."""

import math

import pytest
import torch
from composer.optim import DecoupledAdamW

from tests.common import assert_unchanged, mpt, snapshot, train_losses
from wesar_composer import PaperInit, apply_paper_init, apply_wesar

SIGMA_SQUARED = 4e-5


def _batch(vocab_size=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (4, 32), generator=g)
    return {'input_ids': ids, 'labels': ids.clone()}


def _train(model, optimizer, steps=6):
    return train_losses(model, optimizer, (_batch() for _ in range(steps)))


def _optimizer(model, lr=3e-4):
    return DecoupledAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-30, weight_decay=1e-4)


def test_matrix_lr_trains_like_fixed_gate_wesar():
    """Same seed, same draws: W' = a_r W of fixed-gate WeSaR and the per-matrix-lr model follow one trajectory."""
    gated = mpt(n_layers=2, seed=1)
    gated_opt = _optimizer(gated)
    apply_wesar(gated, gated_opt, sigma_squared=SIGMA_SQUARED, trainable_gates=False, seed=5)
    plain = mpt(n_layers=2, seed=1)
    plain_opt = _optimizer(plain)
    apply_paper_init(plain, plain_opt, backbone='he', matrix_lr_sigma_squared=SIGMA_SQUARED, seed=5)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(batch).logits, gated(batch).logits, rtol=1e-5, atol=1e-5)
    gated_losses = _train(gated, gated_opt)
    plain_losses = _train(plain, plain_opt)
    assert gated_losses[-1] < gated_losses[0] - 0.05  # the runs move
    assert plain_losses == pytest.approx(gated_losses, rel=1e-4)


def test_matrix_lr_groups():
    """Each matrix in a group of lr * s_r / sigma; norms stay at lr; initial_lr follows (for the scheduler)."""
    model = mpt(d_model=64, n_layers=4, seed=0)
    opt = _optimizer(model, lr=1e-3)
    apply_paper_init(model, opt, backbone='small', matrix_lr_sigma_squared=2 / (5 * 64), seed=0)
    lrs = {}
    for group in opt.param_groups:
        assert group['initial_lr'] == group['lr']
        for p in group['params']:
            lrs[p] = group['lr']
    assert len(lrs) == len(list(model.parameters()))
    inner = model.model.transformer
    # Small backbone with sigma = s_small: only W_o and W_d change, by 1 / sqrt(2N)
    assert lrs[inner.blocks[0].attn.out_proj.weight] == pytest.approx(1e-3 / math.sqrt(8))
    assert lrs[inner.blocks[3].ffn.down_proj.weight] == pytest.approx(1e-3 / math.sqrt(8))
    assert lrs[inner.blocks[0].attn.Wqkv.weight] == pytest.approx(1e-3)
    assert lrs[inner.wte.weight] == pytest.approx(1e-3)
    assert lrs[inner.blocks[0].norm_1.weight] == pytest.approx(1e-3)


def test_matrix_lr_refusals():
    model = mpt(n_layers=2, tie_word_embeddings=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match='needs the optimizer'):
        apply_paper_init(model, backbone='he', matrix_lr_sigma_squared=4e-5)
    with pytest.raises(ValueError, match='untied embeddings'):
        apply_paper_init(model, _optimizer(model), backbone='he', matrix_lr_sigma_squared=4e-5)
    with pytest.raises(ValueError, match='matrix_lr_sigma_squared must be a positive'):
        PaperInit(matrix_lr_sigma_squared=0)
    assert_unchanged(model, before)


@pytest.mark.slow
def test_train_from_yaml_schedules_every_group(tiny_train_yaml, tmp_path, monkeypatch):
    """Through llm-foundry: after the scheduler has set every lr, each matrix group keeps its factor."""
    from llmfoundry.command_utils import train_from_yaml

    monkeypatch.chdir(tmp_path)
    sigma_squared = 1e-3
    path = tiny_train_yaml(
        algorithms={'paper_init': {'backbone': 'he', 'matrix_lr_sigma_squared': sigma_squared}},
        max_duration='3ba',
        eval_interval='3ba',
    )
    trainer = train_from_yaml(str(path))
    model = trainer.state.model
    groups = trainer.state.optimizers[0].param_groups
    base = next(g for g in groups if any(p is model.model.transformer.blocks[0].norm_1.weight for p in g['params']))
    assert base['lr'] > 0
    d_model = model.config.d_model
    n_layers = model.config.n_layers
    down = model.model.transformer.blocks[0].ffn.down_proj.weight
    down_group = next(g for g in groups if any(p is down for p in g['params']))
    s_d = math.sqrt(2) / math.sqrt(4 * d_model) / math.sqrt(2 * n_layers)  # He, gain sqrt(2), / sqrt(2N)
    assert down_group['lr'] == pytest.approx(base['lr'] * s_d / math.sqrt(sigma_squared), rel=1e-6)
    assert math.isfinite(trainer.state.loss.item())
    trainer.close()
